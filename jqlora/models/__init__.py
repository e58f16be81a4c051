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
    if model_type not in _FAMILIES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    config_cls, model_cls, _ = _FAMILIES[model_type]
    try:
        config = config_cls.from_hf(hf_config)
    except KeyError as e:
        raise ValueError(
            f"{source}: model_type {model_type!r} needs the key {e.args[0]!r}"
        ) from None
    return model_cls(config, dtype=jnp.dtype(dtype))


__all__ = [
    "CheckpointMap",
    "KVCache",
    "checkpoint_map",
    "model_for_config",
    "supported_model_types",
]
