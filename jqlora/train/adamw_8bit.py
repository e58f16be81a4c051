"""AdamW with its two moments stored in 8 bits, blockwise, as bitsandbytes' ``AdamW8bit``.

Each moment of a leaf with at least ``min_8bit_size`` elements is kept as a
``QuantizedMoment``: one uint8 code per element (the leaf's shape) and one float32 absmax
per block of ``BLOCKSIZE = 256`` consecutive elements (row-major). A code indexes the
dynamic 8-bit map (``jqlora.quant.codebooks``): the signed map for the first moment ``m``,
the unsigned map for the second moment ``v``. One update, with ``D`` decoding and ``Q``
encoding a moment::

    m = b1 D(m_q) + (1 - b1) g
    v = b2 D(v_q) + (1 - b2) g^2
    u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)        (float32, from the new m, v)
    m_q, v_q = Q(m), Q(v)

    D(c, absmax) = map[c] * absmax
    Q(x)         = (nearest code of the map to clip(x * (1 / absmax), -1, 1), absmax),
                   absmax = max |x| over the block; a value on a midpoint takes the lower code

which is the arithmetic of bitsandbytes' 8-bit blockwise Adam, and ``Q`` its portable
``quantize_blockwise`` (the nearest code; its CPU library rounds onto a 65,536-step grid
first, which loses the small magnitudes the dynamic map is made for). ``adamw_8bit`` chains
it with decoupled weight decay and the learning rate, as ``optax.adamw`` does, so that its
update is ``-lr (u + weight_decay * p)``. Smaller leaves keep float32 moments, as
bitsandbytes does below its ``min_8bit_size`` (4096 elements): a few blocks' absmax would
cost nearly what it saves.

State: 2 bytes per element plus 8 bytes per block of 256, against AdamW's 8 bytes. It is an
ordinary optax state (uint8 and float32 arrays), so ``jqlora.offload(adamw_8bit(lr))`` keeps
it in host memory, JAX's counterpart of bitsandbytes' ``paged_adamw_8bit``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jqlora.quant.codebooks import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED

BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096


class QuantizedMoment(NamedTuple):
    """A moment in 8 bits: ``codes`` (uint8, the leaf's shape), ``absmax`` (float32, one per
    block of `BLOCKSIZE` elements of the flattened leaf)."""

    codes: jax.Array
    absmax: jax.Array


class ScaleByAdam8bitState(NamedTuple):
    # Shadows tuple.count on purpose: optax names its step counters so.
    count: jax.Array  # type: ignore[assignment]  # int32: updates applied
    mu: optax.Updates  # QuantizedMoment (or float32 array, small leaves) per leaf
    nu: optax.Updates


def _midpoints(book: np.ndarray) -> np.ndarray:
    return ((book[:-1] + book[1:]) / np.float32(2)).astype(np.float32)


def quantize_blockwise(
    x: jax.Array, book: np.ndarray, blocksize: int = BLOCKSIZE
) -> QuantizedMoment:
    """``x`` as the nearest codes of ``book`` (sorted) after scaling each block of ``blocksize``
    flattened elements by ``1 / max |x|`` (an all-zero block scales by ``1 / 1e-38``)."""
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    n_blocks = -(-n // blocksize)
    blocks = jnp.pad(flat, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
    codes = jnp.searchsorted(jnp.asarray(_midpoints(book)), scaled, side="left")
    return QuantizedMoment(codes.astype(jnp.uint8).reshape(-1)[:n].reshape(x.shape), absmax)


def dequantize_blockwise(q: QuantizedMoment, book: np.ndarray, blocksize: int = BLOCKSIZE):
    """The float32 values ``book[codes] * absmax`` of ``q``, in the shape of its codes."""
    values = jnp.asarray(book)[q.codes.reshape(-1).astype(jnp.int32)]
    n = values.shape[0]
    n_blocks = q.absmax.shape[0]
    padded = jnp.pad(values, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    return (padded * q.absmax[:, None]).reshape(-1)[:n].reshape(q.codes.shape)


def _is_moment(x) -> bool:
    return isinstance(x, QuantizedMoment)


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """Adam's scaling ``u = m_hat / (sqrt(v_hat) + eps)`` with both moments stored blockwise in
    8 bits (module doc). Leaves of fewer than ``min_8bit_size`` elements keep float32 moments."""

    def store(x, book):
        return quantize_blockwise(x, book) if x.size >= min_8bit_size else x

    def load(m, book):
        return dequantize_blockwise(m, book) if _is_moment(m) else m

    def init_fn(params):
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
        return ScaleByAdam8bitState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(lambda p: store(zeros(p), DYNAMIC_SIGNED), params),
            nu=jax.tree.map(lambda p: store(zeros(p), DYNAMIC_UNSIGNED), params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t

        def leaf(g, m_q, v_q):
            g32 = g.astype(jnp.float32)
            m = b1 * load(m_q, DYNAMIC_SIGNED) + (1.0 - b1) * g32
            v = b2 * load(v_q, DYNAMIC_UNSIGNED) + (1.0 - b2) * g32 * g32
            u = (m / c1) / (jnp.sqrt(v / c2) + eps)
            return u.astype(g.dtype), store(m, DYNAMIC_SIGNED), store(v, DYNAMIC_UNSIGNED)

        out = jax.tree.map(leaf, updates, state.mu, state.nu, is_leaf=_is_moment)
        treedef = jax.tree.structure(updates)
        u, mu, nu = (
            jax.tree.unflatten(treedef, [o[i] for o in treedef.flatten_up_to(out)])
            for i in range(3)
        )
        return u, ScaleByAdam8bitState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """AdamW with 8-bit blockwise moments: ``p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)``,
    optax.adamw's update with `scale_by_adam_8bit` in place of ``scale_by_adam``."""
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, min_8bit_size),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
