"""Grouped-query softmax attention with a hand-written backward pass.

With query heads grouped by the KV head they read (``q [b, kv, g, s, d]``, head-major) and
``P`` the softmax probabilities::

    S  = scale * q k^T      masked to -inf-like where the mask is false, float32
    P  = softmax(S)         over the keys
    O  = P v

    dP = dO v^T
    dS = P * (dP - rowsum(dO * O))       (rowsum over d: equals rowsum(P * dP)); 0 where masked
    dq = scale * dS k,   dk = scale * dS^T q,   dv = P^T dO

Every matmul takes its operands in the compute dtype and accumulates in float32. Autodiff
of the same forward pass gets two things wrong for speed on a CPU: the transpose of a
float32-output dot multiplies in float32 (converting the bfloat16 operand first), and the
softmax backward reduces ``P * dP`` over all keys where ``dO * O`` over the head dimension
is 4x smaller at ``d = 64, t = 256``. ``P`` is kept for the backward pass in the compute
dtype (the operand dtype of ``O = P v`` and ``dv = P^T dO`` anyway).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = {"preferred_element_type": jnp.float32}


def _probs(q, k, mask, scale):
    """``softmax(scale * q k^T)`` over keys, masked, in float32: ``[b, kv, g, s, t]``."""
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, **_F32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_attention(q, k, v, mask, scale: float):
    return _fwd(q, k, v, mask, scale)[0]


def _fwd(q, k, v, mask, scale):
    probs = _probs(q, k, mask, scale).astype(v.dtype)
    out = jnp.einsum("bkgst,bktd->bkgsd", probs, v, **_F32).astype(v.dtype)
    return out, (q, k, v, mask, probs, out)


def _bwd(scale, residuals, d_out):
    q, k, v, mask, probs, out = residuals
    d_out = d_out.astype(v.dtype)
    d_probs = jnp.einsum("bkgsd,bktd->bkgst", d_out, v, **_F32)
    row = jnp.einsum("bkgsd,bkgsd->bkgs", d_out, out, **_F32)
    d_scores = probs.astype(jnp.float32) * (d_probs - row[..., None]) * scale
    # Masked scores are constants: no gradient, also in a fully masked (uniform) row.
    d_scores = jnp.where(mask[:, None, None], d_scores, 0.0).astype(q.dtype)
    dq = jnp.einsum("bkgst,bktd->bkgsd", d_scores, k, **_F32)
    dk = jnp.einsum("bkgst,bkgsd->bktd", d_scores, q, **_F32)
    dv = jnp.einsum("bkgst,bkgsd->bktd", probs, d_out, **_F32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_grouped_attention.defvjp(_fwd, _bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query softmax attention.

    ``q: [b, s, h, d]``, ``k, v: [b, t, kv, d]`` with ``h`` a multiple of ``kv`` (query head
    ``i`` reads KV head ``i // (h / kv)``), ``mask: [b, s, t]`` bool. Scores
    ``scale * q.k`` and the softmax are float32; a fully masked row (a padding query)
    comes out as a uniform average instead of NaN. Returns ``[b, s, h * d]`` in v's dtype.
    Differentiable in ``q``, ``k`` and ``v`` (module doc).
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    # Head-major inside: every product is then one batched GEMM over contiguous [s, d] or
    # [s, t] blocks; on the token-major layout XLA's CPU back end ran them 4-5x slower.
    q = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, s, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]
    out = _grouped_attention(q, k, v, mask, float(scale))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h * d)
