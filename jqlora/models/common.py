"""The shared model pieces under one name, for code written before they were split up.

They live in ``jqlora.models.layers`` (embeddings, norms, activations), ``.rope``,
``.attention``, ``.cache`` (KV cache, masks), ``.layer_list`` (the layer loop and scan),
``.head`` (the causal-LM model and its output head) and ``.checkpoint_map``.
"""

from __future__ import annotations

from jqlora.models.attention import attention
from jqlora.models.cache import (
    KVCache,
    attention_mask,
    default_positions,
    init_cache,
    next_cache,
    write_cache,
)
from jqlora.models.checkpoint_map import CheckpointMap
from jqlora.models.head import CausalLM, tied_logits
from jqlora.models.layer_list import LayerList, layer_variables, scan_blocks, stack_layer_variables
from jqlora.models.layers import (
    ACTIVATIONS,
    Embed,
    LayerNorm,
    Linear,
    RMSNorm,
    activation,
    gated_activation,
    head_scale,
    soft_cap,
)
from jqlora.models.rope import apply_rope, rope_tables

__all__ = [
    "ACTIVATIONS",
    "CausalLM",
    "CheckpointMap",
    "Embed",
    "KVCache",
    "LayerList",
    "LayerNorm",
    "Linear",
    "RMSNorm",
    "activation",
    "apply_rope",
    "attention",
    "attention_mask",
    "default_positions",
    "gated_activation",
    "head_scale",
    "init_cache",
    "layer_variables",
    "next_cache",
    "rope_tables",
    "scan_blocks",
    "soft_cap",
    "stack_layer_variables",
    "tied_logits",
    "write_cache",
]
