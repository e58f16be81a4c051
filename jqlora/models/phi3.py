"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (``model_type`` phi3) as `jqlora.models.decoder`
configs.

A Llama-like decoder whose attention input projection is one ``qkv_proj`` (rows q, k, v)
and whose MLP input projection is one ``gate_up_proj`` (rows gate, up); adapters sit on
these fused modules, as PEFT puts them. RoPE rotates the first ``partial_rotary_factor``
of each head (Phi-4-mini: 3/4) and may be LongRoPE (``rope_type`` longrope, or the old
names su and yarn); an optional ``sliding_window`` covers every layer.
"""

from __future__ import annotations

from jqlora.models import rope
from jqlora.models.decoder import (
    CHECKPOINT,
    DecoderConfig,
    DecoderForCausalLM,
    freeze_rope,
    sizes_from_hf,
)

MODEL_TYPES = ("phi3",)
ARCHITECTURES = {"phi3": "Phi3ForCausalLM"}
__all__ = ["CHECKPOINT", "DecoderForCausalLM", "config_from_hf"]


def _rope(d: dict) -> dict:
    raw = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if raw.get("rope_type", raw.get("type")) in ("su", "yarn"):  # Phi-3's old names
        raw.pop("type", None)
        raw["rope_type"] = "longrope"
    params = rope.rope_parameters(d, raw)
    if params["rope_type"] == "longrope":
        params.setdefault(
            "original_max_position_embeddings", d.get("original_max_position_embeddings", 4096)
        )
    return params


def config_from_hf(d: dict) -> DecoderConfig:
    heads = d["num_attention_heads"]
    n_layers = d["num_hidden_layers"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    params = _rope(d)
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    return DecoderConfig(
        **sizes_from_hf(d, head_dim, eps=1e-5, max_positions=4096, tied=False),
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        hidden_act=d.get("hidden_act", "silu"),
        ropes=(freeze_rope(params),),
        layer_ropes=(0,) * n_layers,
        sliding_windows=(d.get("sliding_window"),) * n_layers,
        rotary_dim=int(head_dim * partial),
        attn_scale=head_dim**-0.5,
        fused_projections=True,
        hf=dict(d),
    )
