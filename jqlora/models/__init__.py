"""Flax (linen) causal language models whose params paths are Hugging Face parameter names.

``model_for_config(hf_config_dict, dtype)`` builds the model for a config.json; every model is
called as ``model.apply({"params": p[, "lora": l]}, input_ids, attention_mask=None,
positions=None, cache=None)`` and has ``init_cache(batch, max_len)`` (see
``jqlora.models.common`` for the cache).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jqlora.models import gpt2, llama, opt
from jqlora.models.common import CheckpointMap, KVCache
from jqlora.models.llama import LlamaConfig, LlamaForCausalLM

_FAMILIES: dict[str, tuple[type[Any], type[Any], CheckpointMap]] = {}  # model_type -> classes


def _register(module, config_cls, model_cls):
    for t in module.MODEL_TYPES:
        _FAMILIES[t] = (config_cls, model_cls, module.CHECKPOINT)


_register(llama, LlamaConfig, LlamaForCausalLM)
_register(opt, opt.OPTConfig, opt.OPTForCausalLM)
_register(gpt2, gpt2.GPT2Config, gpt2.GPT2LMHeadModel)


def checkpoint_map(model_type: str) -> CheckpointMap:
    return _FAMILIES[model_type][2]


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def model_for_config(hf_config: dict, dtype=jnp.float32, *, source: str = "config.json"):
    """The model for a Hugging Face config dict; ``dtype`` is the compute dtype."""
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    config_cls, model_cls, _ = _FAMILIES[model_type]
    _check_sizes(hf_config, source)
    try:
        config = config_cls.from_hf(hf_config)
    except KeyError as e:
        raise ValueError(
            f"{source}: model_type {model_type!r} needs the key {e.args[0]!r}"
        ) from None
    _check_heads(config, source)
    return model_cls(config, dtype=jnp.dtype(dtype))


# config.json sizes that must be positive integers when present (any architecture)
_SIZE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "ffn_dim", "word_embed_proj_dim", "n_embd", "n_inner", "n_layer", "n_head", "n_positions",
)  # fmt: skip


def _check_sizes(hf_config: dict, source: str) -> None:
    for key in _SIZE_KEYS:
        value = hf_config.get(key)
        if value is None:
            continue  # absent, or null for "the default" (head_dim, n_inner)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")


def _check_heads(config, source: str) -> None:
    """Attention heads must split the width (and share the key/value heads) evenly."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    kv = getattr(config, "num_key_value_heads", None)
    own_head_dim = bool(config.hf.get("head_dim"))  # Llama-family may set it apart from width
    if heads and width and not own_head_dim and width % heads:
        raise ValueError(
            f"{source}: hidden size {width} is not divisible by the {heads} attention heads"
        )
    if heads and kv and heads % kv:
        raise ValueError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )


__all__ = [
    "CheckpointMap",
    "KVCache",
    "checkpoint_map",
    "model_for_config",
    "supported_model_types",
]
