"""The LoRA branch ``scale * (dropout(x) @ a.T @ b.T)`` with a hand-written backward pass.

Two choices here are made for speed, and both are exact:

**Dropout masks from a counter hash.** Element ``i`` of an input of ``n`` elements is kept
when ``h(i) >= t``, with ``h = fmix32(fmix32(i ^ s0) ^ s1)`` (MurmurHash3's 32-bit
finaliser applied twice), ``(s0, s1)`` 32 random bits drawn once per module and step from
its ``"dropout"`` rng, and ``t = round(rate * 2^32)``. Kept elements are scaled by
``2^32 / (2^32 - t)``, so ``E[dropout(x)] = x`` exactly; the drop rate is ``t / 2^32``,
within 2^-33 of ``rate``. Drawing a threefry bit per element costs ~15 ns on a CPU and was
a fifth of a QLoRA step; the hash is a dozen integer operations that fuse into the
multiply, and the backward pass recomputes the mask from the two seeds instead of storing
it. The masks differ from PyTorch's (as any two frameworks' do); the rate and the scaling
are the same.

**Gradients in the orientation XLA's CPU matmul takes without a transpose.** With
``h = x_d a^T`` [T, r] and ``g`` the output cotangent [T, out] (T = tokens)::

    dh = s g b                 [T, r]
    db = s (h^T g)^T           [out, r]   computed as (h^T g), a [r, out] result, then transposed
    da = dh^T x_d              [r, in]
    dx = dropout(dh a)         [T, in]   (the same mask)

Autodiff writes ``db = g^T h``, whose big operand ``g`` XLA's CPU back end copies into a
transposed layout first: 30 % of the step on SmolLM2. Here only the small ``h``, ``dh`` and
the result are transposed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_T = (((0,), (0,)), ((), ()))  # dot_general dimensions contracting the leading axes


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _threshold(rate: float) -> int:
    return min(round(rate * 2**32), 2**32 - 1)


def dropout_seed(rng) -> jax.Array:
    """The two uint32 seeds of one dropout mask, drawn from a JAX PRNG key."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_mask(seed: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask of the elements dropout keeps (module doc); a function of ``seed`` only."""
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _fmix32(_fmix32(index ^ seed[0]) ^ seed[1]) >= jnp.uint32(_threshold(rate))


def dropout(x: jax.Array, seed: jax.Array | None, rate: float) -> jax.Array:
    """Inverted dropout of ``x`` (module doc); the identity when ``seed`` is None."""
    if seed is None or rate <= 0.0:
        return x
    t = _threshold(rate)
    scale = jnp.asarray(2**32 / (2**32 - t), x.dtype)
    return jnp.where(keep_mask(seed, x.shape, rate), x * scale, jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lora_delta(x, a, b, seed, scale: float, rate: float):
    """``scale * (dropout(x) @ a.T @ b.T)``; x [..., in], a [r, in], b [out, r], one dtype.

    ``seed`` (uint32[2], or None for no dropout) selects the dropout mask. Differentiable in
    ``x``, ``a`` and ``b``.
    """
    return _forward(x, a, b, seed, scale, rate)[0]


def _forward(x, a, b, seed, scale, rate):
    h = dropout(x, seed, rate) @ a.T
    return (h @ b.T) * jnp.asarray(scale, x.dtype), h


def _fwd(x, a, b, seed, scale, rate):
    y, h = _forward(x, a, b, seed, scale, rate)
    return y, (x, a, b, seed, h)


def _bwd(scale, rate, residuals, g):
    x, a, b, seed, h = residuals
    s = jnp.asarray(scale, g.dtype)
    g2 = g.reshape(-1, g.shape[-1])
    h2 = h.reshape(-1, h.shape[-1])
    xd = dropout(x, seed, rate).reshape(-1, x.shape[-1])
    dh = (g2 @ b) * s
    db = jax.lax.dot_general(h2, g2, _T).T * s
    da = jax.lax.dot_general(dh, xd, _T)
    dx = dropout((dh @ a).reshape(x.shape), seed, rate)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype), None


lora_delta.defvjp(_fwd, _bwd)
