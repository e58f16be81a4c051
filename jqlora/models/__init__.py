"""Flax (linen) causal language models whose params paths are Hugging Face parameter names.

``model_for_config(hf_config_dict, dtype)`` builds the model for a config.json; every model is
a ``jqlora.models.head.CausalLM``, called as ``model.apply({"params": p[, "lora": l]},
input_ids, attention_mask=None, positions=None, cache=None)``, with ``init_cache(batch,
max_len)`` (see ``jqlora.models.cache``). The registry maps each ``model_type`` to its family
module, which names its config parser, model class, checkpoint names and the
``architectures`` entry of a saved config.json.

    layers, rope, attention, cache, layer_list, head    the pieces
    decoder                                             the pre-norm RoPE decoder
    llama, gemma, phi3                                  its families' configs
    opt, gpt2                                           families of their own
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp

from jqlora.models import gemma, gpt2, llama, opt, phi3
from jqlora.models.cache import KVCache
from jqlora.models.checkpoint_map import CheckpointMap
from jqlora.models.decoder import DecoderForCausalLM


class _Family(NamedTuple):
    config_from_hf: Callable[[dict], Any]
    model_cls: type[Any]
    checkpoint: CheckpointMap
    architecture: str  # config.json's "architectures" entry


_FAMILIES: dict[str, _Family] = {}  # model_type -> family


def _register(module, config_from_hf, model_cls, checkpoints=None):
    for t in module.MODEL_TYPES:
        ckpt = (checkpoints or {}).get(t, module.CHECKPOINT)
        _FAMILIES[t] = _Family(config_from_hf, model_cls, ckpt, module.ARCHITECTURES[t])


_register(llama, llama.config_from_hf, DecoderForCausalLM)
# Gemma 3 text models get the image-text names too: the text tower is saved as one of them.
_GEMMA3 = {t: gemma.GEMMA3_CHECKPOINT for t in ("gemma3", "gemma3_text")}
_register(gemma, gemma.config_from_hf, DecoderForCausalLM, _GEMMA3)
_register(phi3, phi3.config_from_hf, DecoderForCausalLM)
_register(opt, opt.OPTConfig.from_hf, opt.OPTForCausalLM)
_register(gpt2, gpt2.GPT2Config.from_hf, gpt2.GPT2LMHeadModel)


def checkpoint_map(model_type: str) -> CheckpointMap:
    return _FAMILIES[model_type].checkpoint


def architecture(model_type: str) -> str:
    """The transformers class name a config.json of ``model_type`` lists in ``architectures``."""
    return _FAMILIES[model_type].architecture


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def model_for_config(hf_config: dict, dtype=jnp.float32, *, source: str = "config.json"):
    """The model for a Hugging Face config dict; ``dtype`` is the compute dtype."""
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    family = _FAMILIES[model_type]
    _check_sizes(hf_config, source)
    try:
        config = family.config_from_hf(hf_config)
    except KeyError as e:
        raise ValueError(
            f"{source}: model_type {model_type!r} needs the key {e.args[0]!r}"
        ) from None
    _check_heads(config, source)
    return family.model_cls(config, dtype=jnp.dtype(dtype))


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
    "architecture",
    "checkpoint_map",
    "model_for_config",
    "supported_model_types",
]
