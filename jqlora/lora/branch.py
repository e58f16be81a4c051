"""The LoRA branch ``scale * (dropout(x) @ a.T @ b.T)`` with a hand-written backward pass.

Two choices here are made for speed, and both are exact:

**Dropout masks from a counter hash.** Element ``i`` of an input of ``n`` elements is kept
when ``h(i) >= t``, with ``h = fmix32(fmix32(i ^ s0) ^ s1)`` (MurmurHash3's 32-bit
finaliser applied twice), ``(s0, s1)`` the two 32-bit words of the module's ``"dropout"`` rng
key for the step, and ``t = round(rate * 2^32)``. Kept elements are scaled by
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

(In the code the dropout's ``1 / (1 - rate)`` is folded into ``s`` and ``x_d`` is ``x`` with
the dropped elements zeroed: a select on the bits, no bfloat16 arithmetic.)

Autodiff writes ``db = g^T h``, whose big operand ``g`` XLA's CPU back end copies into a
transposed layout first: 30 % of the step on SmolLM2. Here only the small ``h``, ``dh`` and
the result are transposed. Every product accumulates in float32, and the two contractions
over tokens take the form XLA's CPU matmul runs fastest (``_token_contraction``).
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
    """The two uint32 seeds of one dropout mask: the first two words of a JAX PRNG key.

    The key is already uniform bits (flax's ``make_rng`` derives each module's key with a
    ``fold_in``), so its words serve as they are. Drawing from it instead
    (``random.bits``) adds a threefry evaluation per module and step, and on SmolLM2 (210
    adapters) those small programs cost XLA's CPU compiler ~10 s of the train step's
    compile.
    """
    return jax.random.key_data(rng).reshape(-1)[:2].astype(jnp.uint32)


def keep_mask(seed: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask of the elements dropout keeps (module doc); a function of ``seed`` only."""
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return _fmix32(_fmix32(index ^ seed[0]) ^ seed[1]) >= jnp.uint32(_threshold(rate))


def keep_scale(rate: float) -> float:
    """``2^32 / (2^32 - t)``: the factor inverted dropout applies to the kept elements."""
    return 2**32 / (2**32 - _threshold(rate)) if rate > 0.0 else 1.0


def zero_dropped(x: jax.Array, seed: jax.Array | None, rate: float) -> jax.Array:
    """``x`` with the elements dropout drops set to zero, the kept ones unscaled.

    A select on the raw bits: on a CPU, arithmetic in bfloat16 goes through float32 and a
    rounding step, and a bfloat16 ``where`` plus multiply cost 3x the bit select. Not
    differentiable (the bit cast has no derivative): for `lora_delta`'s own backward pass.
    """
    if seed is None or rate <= 0.0:
        return x
    uint = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(x, uint)
    kept = jnp.where(keep_mask(seed, x.shape, rate), bits, jnp.zeros((), uint))
    return jax.lax.bitcast_convert_type(kept, x.dtype)


def dropout(x: jax.Array, seed: jax.Array | None, rate: float) -> jax.Array:
    """Inverted dropout of ``x`` (module doc); the identity when ``seed`` is None."""
    if seed is None or rate <= 0.0:
        return x
    scale = jnp.asarray(keep_scale(rate), x.dtype)
    return jnp.where(keep_mask(seed, x.shape, rate), x * scale, jnp.zeros((), x.dtype))


def _dot(x, y, spec: str) -> jax.Array:
    """``einsum(spec, x, y)`` with float32 accumulation (XLA's CPU bfloat16 matmul with a
    bfloat16 result takes a path several times slower than with a float32 one)."""
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _token_contraction(u: jax.Array, v: jax.Array) -> jax.Array:
    """``u^T v`` for ``u [T, r]``, ``v [T, n]``: ``[r, n]`` float32, summed over tokens.

    In bfloat16 the tokens are split into 4 groups and both axes contracted together:
    XLA's CPU back end runs that 3-6x faster than the single-axis contraction (measured at
    T = 1024, n = 192 to 1536), with the same float32 accumulation. In float32 the plain
    contraction is the faster one.
    """
    t = u.shape[0]
    groups = math.gcd(t, 4)
    if u.dtype == jnp.float32 or groups == 1:
        return jax.lax.dot_general(u, v, _T, preferred_element_type=jnp.float32)
    u = u.reshape(groups, t // groups, u.shape[1])
    v = v.reshape(groups, t // groups, v.shape[1])
    return _dot(u, v, "gtr,gtn->rn")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lora_delta(x, a, b, seed, scale: float, rate: float):
    """``scale * (dropout(x) @ a.T @ b.T)`` in x's dtype; x [..., in], a [r, in], b [out, r].

    ``a`` and ``b`` are cast to x's dtype for the matmuls (all accumulate in float32) and
    get their gradients in their own dtype (float32 master weights stay float32).
    ``seed`` (uint32[2], or None for no dropout) selects the dropout mask. Differentiable
    in ``x``, ``a`` and ``b``.
    """
    return _forward(x, a, b, seed, scale, rate)[0]


def _forward(x, a, b, seed, scale, rate):
    # Dropout's 1 / (1 - rate) rides on the scalar scale: h = zero_dropped(x) @ a.T.
    h = _dot(zero_dropped(x, seed, rate), a.astype(x.dtype), "...k,rk->...r").astype(x.dtype)
    y = _dot(h, b.astype(x.dtype), "...r,nr->...n") * _scale(scale, seed, rate)
    return y.astype(x.dtype), h


def _scale(scale: float, seed, rate: float) -> float:
    return scale * (keep_scale(rate) if seed is not None else 1.0)


def _fwd(x, a, b, seed, scale, rate):
    y, h = _forward(x, a, b, seed, scale, rate)
    return y, (x, a, b, seed, h)


def _bwd(scale, rate, residuals, g):
    x, a, b, seed, h = residuals
    dtype = x.dtype
    s = _scale(scale, seed, rate)
    g2 = g.astype(dtype).reshape(-1, g.shape[-1])
    h2 = h.reshape(-1, h.shape[-1])
    xz = zero_dropped(x, seed, rate).reshape(-1, x.shape[-1])
    dh = (_dot(g2, b.astype(dtype), "tn,nr->tr") * s).astype(dtype)
    # The barrier keeps XLA from folding the transpose into the dot: the folded form (a
    # bfloat16 dot contracting both operands' leading axes) has no float32-output CPU kernel.
    db = jax.lax.optimization_barrier(_token_contraction(h2, g2)).T * s
    da = _token_contraction(dh, xz)
    dx = _dot(dh, a.astype(dtype), "tr,rk->tk").astype(dtype).reshape(x.shape)
    return zero_dropped(dx, seed, rate), da.astype(a.dtype), db.astype(b.dtype), None


lora_delta.defvjp(_fwd, _bwd)
