"""The KV cache and the attention masks over it.

A ``KVCache`` holds, for every layer, the keys and values of all slots written so far::

    keys[l], values[l]: [batch, max_len, n_kv_heads, head_dim]
    valid:              [batch, max_len] bool   slot holds a real (not padding) token
    index:              int32 scalar            slots filled so far (same for the batch)

A forward pass with ``cache=`` writes its ``s`` new tokens at slots ``index .. index+s-1``
and lets query slot ``i`` attend to every slot ``j <= i`` with ``valid[j]`` (and, in a
sliding-window layer of window ``w``, ``j > i - w``); it returns ``(logits, new_cache)`` with
``index`` advanced by ``s``. Left padding works by passing the prompt's ``attention_mask`` on
the first call (padding slots stay invalid forever) and the positions the model should see
(``positions``); decoding steps then pass ``[b, 1]`` ids. Every slot is kept, also in
sliding-window layers: the window is a mask, so decoding past it needs no other cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "KVCache",
    "attention_mask",
    "default_positions",
    "init_cache",
    "next_cache",
    "write_cache",
]


class KVCache(NamedTuple):
    """Keys/values of every layer for generation; see the module docstring."""

    keys: tuple
    values: tuple
    valid: jax.Array
    # Shadows tuple.index on purpose (the write position); typeshed's tuple declares a method.
    index: jax.Array  # type: ignore[assignment]


def init_cache(
    n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32
) -> KVCache:
    """An empty cache of ``max_len`` slots."""
    shape = (batch, max_len, n_kv_heads, head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(n_layers))
    return KVCache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def attention_mask(
    batch: int,
    seq: int,
    padding_mask: jax.Array | None,
    cache: KVCache | None,
    sliding_window: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(mask [b, s, t], valid [b, t])``: query ``i`` may see key ``j`` iff ``j <= i``, key ``j``
    is valid (not padding) and, with a window ``w``, ``j > i - w``.

    Without a cache the keys are this call's ``s`` tokens; with one they are the cache's
    ``max_len`` slots after this call's tokens are written at ``cache.index``.
    """
    new_valid = jnp.ones((batch, seq), bool) if padding_mask is None else padding_mask.astype(bool)
    if cache is None:
        start: int | jax.Array = 0
        valid = new_valid
    else:
        start = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, start))
    q_slot = start + jnp.arange(seq)[:, None]
    k_slot = jnp.arange(valid.shape[1])[None, :]
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed = allowed & (k_slot > q_slot - sliding_window)
    return allowed[None] & valid[:, None, :], valid


def write_cache(
    cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, index
) -> tuple[jax.Array, jax.Array]:
    """The layer's cache with ``k, v: [b, s, kv, d]`` written at slot ``index``."""
    k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
    return k, v


def next_cache(cache: KVCache | None, new_kv: list, valid: jax.Array, seq: int) -> KVCache | None:
    """The cache after a forward pass of ``seq`` tokens (None without a cache)."""
    if cache is None:
        return None
    return KVCache(
        tuple(k for k, _ in new_kv), tuple(v for _, v in new_kv), valid, cache.index + seq
    )


def default_positions(batch: int, seq: int, cache: KVCache | None) -> jax.Array:
    """``index + arange(seq)`` for every row: transformers' default ``position_ids``."""
    start = 0 if cache is None else cache.index
    return jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
