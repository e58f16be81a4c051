"""The causal-LM model every family shares: a backbone, then the output head.

    h       = backbone(input_ids, attention_mask, positions, cache)     (final hidden states)
    logits  = h @ W.T                          W: lm_head, or the input embedding when tied
    logits  = cap * tanh(logits / cap)         when the config sets final_logit_softcapping

A family subclasses `CausalLM` and names its backbone module (``BACKBONE``, created as
``BACKBONE(config, dtype, remat, scan_layers)`` under ``BACKBONE_NAME``) and where its input
embedding lies (``TIED_EMBEDDING``); its config says the cache's shape (``cache_layout``:
``(layers, kv_heads, head_dim)``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jqlora.models.cache import KVCache, init_cache
from jqlora.models.layers import Linear, soft_cap

__all__ = ["CausalLM", "tied_logits"]


def tied_logits(h: jax.Array, embedding: jax.Array) -> jax.Array:
    """``h @ embedding.T``: the output head of a model whose lm_head is its input embedding."""
    return jnp.einsum(
        "...d,vd->...v", h, embedding.astype(h.dtype), preferred_element_type=jnp.float32
    ).astype(h.dtype)


class CausalLM(nn.Module):
    """``apply({"params": p[, "lora": l]}, input_ids, attention_mask=None, positions=None,
    cache=None)`` -> logits ``[b, s, vocab]`` (and the new cache when one is given).

    ``hidden_only=True`` returns the hidden states the head would read instead, so that a
    loss can apply the head itself (``jqlora.train.head_loss``) with the weight at
    ``head_weight_path()``; that path is None when the head is more than a matmul (soft-capped
    logits). ``remat`` names a ``jax.checkpoint_policies`` policy under which each decoder
    layer is rematerialized; ``scan_layers`` runs alike layers as one loop
    (``jqlora.models.layer_list.LayerList``).
    """

    config: Any
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None
    scan_layers: bool = False

    BACKBONE: ClassVar[type[nn.Module]]
    BACKBONE_NAME: ClassVar[str] = "model"
    TIED_EMBEDDING: ClassVar[tuple[str, ...]] = ()

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache=None, hidden_only=False
    ):
        backbone = self.BACKBONE(  # type: ignore[call-arg]
            self.config, self.dtype, self.remat, self.scan_layers, name=self.BACKBONE_NAME
        )
        h, new_cache = backbone(input_ids, attention_mask, positions, cache)
        if hidden_only:
            return h
        logits = self._head_logits(h)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = soft_cap(logits, cap)
        return logits if cache is None else (logits, new_cache)

    def _head_logits(self, h: jax.Array) -> jax.Array:
        c = self.config
        if c.tie_word_embeddings:
            weight = self.variables["params"]
            for key in self.TIED_EMBEDDING:
                weight = weight[key]
            return tied_logits(h, weight)  # type: ignore[arg-type]
        return Linear(c.vocab_size, False, self.dtype, name="lm_head")(h)

    def head_weight_path(self) -> tuple[str, ...] | None:
        """The params path of the head's ``[vocab, hidden]`` weight; None when the logits are
        soft-capped (the loss must then read the model's logits)."""
        if getattr(self.config, "final_logit_softcapping", None):
            return None
        return self.TIED_EMBEDDING if self.config.tie_word_embeddings else ("lm_head", "weight")

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of ``max_len`` slots (``jqlora.models.cache``)."""
        layers, kv_heads, head_dim = self.config.cache_layout
        return init_cache(layers, batch, max_len, kv_heads, head_dim, dtype or self.dtype)
