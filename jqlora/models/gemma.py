"""Gemma 2 and Gemma 3's text model (``model_type`` gemma2, gemma3_text) as
`jqlora.models.decoder` configs.

Both: embeddings times ``sqrt(hidden)``, norms ``(1 + w) * normed``, norms before and after
attention and MLP, GeGLU (tanh GELU), ``head_dim`` apart from hidden / heads, q.k scaled by
``query_pre_attn_scalar^-1/2``, sliding-window and global layers (``layer_types``; by
default Gemma 2 alternates, starting with a sliding one, and Gemma 3 has every sixth layer
global), embeddings tied to the head by default.

* Gemma 2: attention logits ``c tanh(s / c)`` (``attn_logit_softcapping``) and final logits
  likewise (``final_logit_softcapping``); one RoPE.
* Gemma 3: per-head q/k norms; its own RoPE for each layer type (``rope_parameters`` keyed by
  ``sliding_attention`` / ``full_attention``; old configs: ``rope_local_base_freq`` for the
  sliding layers, ``rope_theta`` and ``rope_scaling`` for the global ones); no soft-capping
  unless the config sets it.
* Gemma 3 image-text checkpoints (``model_type`` gemma3): their text tower, a
  ``gemma3_text`` model (``text_config``; its tensors ``language_model.model.*`` or
  ``model.language_model.*``, the vision tower's left out). It is saved as a text model.
"""

from __future__ import annotations

from jqlora.models import rope
from jqlora.models.checkpoint_map import CheckpointMap
from jqlora.models.decoder import (
    CHECKPOINT,
    DecoderConfig,
    DecoderForCausalLM,
    freeze_rope,
    sizes_from_hf,
)

MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")
ARCHITECTURES = {
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",  # the text tower is saved as a text model
}
GEMMA3_CHECKPOINT = CheckpointMap(
    ignore=(*CHECKPOINT.ignore, r"(model\.)?(vision_tower|multi_modal_projector)\..*"),
    renames=((r"^language_model\.model\.", "model."), (r"^model\.language_model\.", "model.")),
)
__all__ = ["CHECKPOINT", "GEMMA3_CHECKPOINT", "DecoderForCausalLM", "config_from_hf"]

# Gemma3TextConfig's defaults, which an image-text checkpoint's text_config may leave out
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
)  # fmt: skip

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _layer_types(d: dict, gemma3: bool) -> list[str]:
    if d.get("layer_types"):
        return list(d["layer_types"])
    every = d.get("sliding_window_pattern", 6) if gemma3 else 2
    return [_SLIDING if (i + 1) % every else _FULL for i in range(d["num_hidden_layers"])]


def gemma3_ropes(d: dict) -> dict[str, dict]:
    """``{layer type: rope parameters}`` of a Gemma 3 config, new form or old."""
    nested = d.get("rope_parameters")
    if isinstance(nested, dict) and (_SLIDING in nested or _FULL in nested):
        full, sliding = nested.get(_FULL) or {}, nested.get(_SLIDING) or {}
    else:  # old form: one top-level rope_scaling applies to the global layers
        full, sliding = dict(nested or d.get("rope_scaling") or {}), {}
    local_theta = d.get("rope_local_base_freq") or 10_000.0
    return {
        _FULL: rope.rope_parameters(d, full, theta=1_000_000.0),
        _SLIDING: rope.rope_parameters({"rope_theta": local_theta}, sliding),
    }


def config_from_hf(d: dict) -> DecoderConfig:
    if d.get("model_type") == "gemma3":
        d = {**_GEMMA3_TEXT_DEFAULTS, **(d.get("text_config") or {}), "model_type": "gemma3_text"}
    model_type = d.get("model_type", "gemma2")
    gemma3 = model_type == "gemma3_text"
    if d.get("use_bidirectional_attention"):
        raise ValueError(
            "config.json: use_bidirectional_attention (EmbeddingGemma) is not supported"
        )
    n_layers = d["num_hidden_layers"]
    head_dim = d.get("head_dim") or 256
    kinds = _layer_types(d, gemma3)
    if gemma3:
        by_kind = gemma3_ropes(d)
        ropes = tuple(dict.fromkeys(freeze_rope(by_kind[k]) for k in kinds))
        layer_ropes = tuple(ropes.index(freeze_rope(by_kind[k])) for k in kinds)
    else:
        ropes, layer_ropes = (freeze_rope(rope.rope_parameters(d)),), (0,) * n_layers
    window = d.get("sliding_window", 4096)
    bias = bool(d.get("attention_bias", False))
    softcaps = (None, None) if gemma3 else (50.0, 30.0)  # transformers' defaults
    return DecoderConfig(
        **sizes_from_hf(d, head_dim, eps=1e-6, max_positions=8192, tied=True),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
        ropes=ropes,
        layer_ropes=layer_ropes,
        sliding_windows=tuple(window if k == _SLIDING else None for k in kinds),
        rotary_dim=head_dim,
        attn_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        norm_offset=1.0,
        qk_norm=gemma3,
        sandwich_norms=True,
        embed_scale=True,
        attn_logit_softcapping=d.get("attn_logit_softcapping", softcaps[0]),
        final_logit_softcapping=d.get("final_logit_softcapping", softcaps[1]),
        hf=dict(d),
    )
