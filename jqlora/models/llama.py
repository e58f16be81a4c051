"""The Llama family: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2 (``model_type`` llama, mistral,
qwen2, qwen3), as `jqlora.models.decoder` configs.

Grouped-query attention (``num_key_value_heads``), RoPE with the ``rope_scaling`` variants
of ``jqlora.models.rope``, q/k/v biases (Qwen2, or ``attention_bias``), per-head q/k
RMSNorm and an explicit ``head_dim`` (Qwen3), sliding windows (Mistral: every layer;
Qwen2/3: the ``sliding_attention`` layers when ``use_sliding_window``).
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

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
__all__ = ["CHECKPOINT", "DecoderForCausalLM", "config_from_hf"]


def _qwen_windows(d: dict, n_layers: int) -> tuple:
    """Qwen2/3: the window on the ``sliding_attention`` layers when ``use_sliding_window``
    (by default the layers from ``max_window_layers`` on, as transformers fills them in)."""
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    kinds = d.get("layer_types") or [
        "sliding_attention" if window is not None and i >= d.get("max_window_layers", 28)
        else "full_attention"
        for i in range(n_layers)
    ]  # fmt: skip
    return tuple(window if k == "sliding_attention" else None for k in kinds)


def config_from_hf(d: dict) -> DecoderConfig:
    model_type = d.get("model_type", "llama")
    heads = d["num_attention_heads"]
    n_layers = d["num_hidden_layers"]
    qwen2, qwen3 = model_type == "qwen2", model_type == "qwen3"
    if qwen2 or qwen3:
        windows = _qwen_windows(d, n_layers)
    else:
        windows = (d.get("sliding_window"),) * n_layers
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    bias = bool(d.get("attention_bias", False))
    return DecoderConfig(
        **sizes_from_hf(d, head_dim, eps=1e-6, max_positions=2048, tied=False),
        qkv_bias=qwen2 or bias,
        o_bias=(not qwen2) and bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        hidden_act=d.get("hidden_act", "silu"),
        ropes=(freeze_rope(rope.rope_parameters(d)),),
        layer_ropes=(0,) * n_layers,
        sliding_windows=windows,
        rotary_dim=head_dim,
        attn_scale=head_dim**-0.5,
        qk_norm=qwen3,
        hf=dict(d),
    )
