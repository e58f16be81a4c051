"""Grouped-query softmax attention with a hand-written backward pass.

With query heads grouped by the KV head they read (``q [b, kv, g, s, d]``, head-major) and
``P`` the softmax probabilities::

    S  = scale * q k^T      masked to -inf-like where the mask is false, float32
                            (soft-capped: S = c tanh(scale * q k^T / c), Gemma 2)
    P  = softmax(S)         over the keys
    O  = P v

    dP = dO v^T
    dS = P * (dP - rowsum(dO * O))       (rowsum over d: equals rowsum(P * dP)); 0 where masked
         (soft-capped: times 1 - (S / c)^2, the derivative of the cap)
    dq = scale * dS k,   dk = scale * dS^T q,   dv = P^T dO

Every matmul takes its operands in the compute dtype and accumulates in float32. Autodiff
of the same forward pass gets two things wrong for speed on a CPU: the transpose of a
float32-output dot multiplies in float32 (converting the bfloat16 operand first), and the
softmax backward reduces ``P * dP`` over all keys where ``dO * O`` over the head dimension
is 4x smaller at ``d = 64, t = 256``. ``P`` is kept for the backward pass in the compute
dtype (the operand dtype of ``O = P v`` and ``dv = P^T dO`` anyway).

**Causal blocks.** When the caller knows the mask is causal (``causal=True``: query ``i``
never sees a key after position ``i``, as in training without a cache), the queries go
in blocks, and each block meets only the keys up to its own last position: the keys after
it are masked for every query in the block, so leaving them out changes nothing. With
``n`` blocks that is ``(n + 1) / 2n`` of the score matrix (5/8 at 4 blocks); every
elementwise pass of the softmax and its backward shrinks with it. On a 2-core CPU this
took a SmolLM2 layer's attention (4 x 256 tokens, forward and backward) from ~13 to ~9 ms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = {"preferred_element_type": jnp.float32}

#: Causal blocks: at most this many query blocks ...
MAX_QUERY_BLOCKS = 8
#: ... of at least this many queries each.
MIN_QUERY_BLOCK = 64


def query_blocks(s: int, t: int, causal: bool) -> list[tuple[int, int, int]]:
    """``(first query, end query, end key)`` of each block of queries.

    One block over all keys unless ``causal`` with as many keys as queries; then up to
    `MAX_QUERY_BLOCKS` blocks of at least `MIN_QUERY_BLOCK` queries, each block seeing the
    keys up to its end.
    """
    if not causal or s != t or s <= MIN_QUERY_BLOCK:
        return [(0, s, t)]
    n = min(MAX_QUERY_BLOCKS, -(-s // MIN_QUERY_BLOCK))
    size = -(-s // n)
    return [(start, min(start + size, s), min(start + size, s)) for start in range(0, s, size)]


def _scores(q, k, scale, softcap):
    """``scale * q k^T``, soft-capped at ``softcap`` when given, float32 ``[b, kv, g, s, t]``."""
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, **_F32) * scale
    return scores if softcap is None else jnp.tanh(scores / softcap) * softcap


def _probs(q, k, mask, scale, softcap):
    """``softmax(S)`` of the `_scores` over keys, masked, in float32."""
    scores = _scores(q, k, scale, softcap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _concat_queries(parts):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _grouped_attention(q, k, v, mask, scale: float, causal: bool, softcap: float | None):
    return _fwd(q, k, v, mask, scale, causal, softcap)[0]


def _fwd(q, k, v, mask, scale, causal, softcap):
    outs, probs = [], []
    for q0, q1, end in query_blocks(q.shape[3], k.shape[2], causal):
        p = _probs(q[:, :, :, q0:q1], k[:, :, :end], mask[:, q0:q1, :end], scale, softcap)
        p = p.astype(v.dtype)
        outs.append(jnp.einsum("bkgst,bktd->bkgsd", p, v[:, :, :end], **_F32).astype(v.dtype))
        probs.append(p)
    out = _concat_queries(outs)
    return out, (q, k, v, mask, probs, out)


def _bwd(scale, causal, softcap, residuals, d_out):
    q, k, v, mask, probs, out = residuals
    d_out = d_out.astype(v.dtype)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    t = k.shape[2]
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (q0, q1, end), p in zip(query_blocks(q.shape[3], t, causal), probs, strict=True):
        d_o = d_out[:, :, :, q0:q1]
        d_p = jnp.einsum("bkgsd,bktd->bkgst", d_o, v[:, :, :end], **_F32)
        d_s = p.astype(jnp.float32) * (d_p - row[:, :, :, q0:q1, None]) * scale
        if softcap is not None:  # the scores are recomputed: one matmul instead of a copy
            capped = _scores(q[:, :, :, q0:q1], k[:, :, :end], scale, softcap) / softcap
            d_s = d_s * (1.0 - capped * capped)
        # Masked scores are constants: no gradient, also in a fully masked (uniform) row.
        d_s = jnp.where(mask[:, None, None, q0:q1, :end], d_s, 0.0).astype(q.dtype)
        dq.append(jnp.einsum("bkgst,bktd->bkgsd", d_s, k[:, :, :end], **_F32))
        dk = dk.at[:, :, :end].add(jnp.einsum("bkgst,bkgsd->bktd", d_s, q[:, :, :, q0:q1], **_F32))
        dv = dv.at[:, :, :end].add(jnp.einsum("bkgst,bkgsd->bktd", p, d_o, **_F32))
    return _concat_queries(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_grouped_attention.defvjp(_fwd, _bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    *,
    causal: bool = False,
    softcap: float | None = None,
) -> jax.Array:
    """Grouped-query softmax attention.

    ``q: [b, s, h, d]``, ``k, v: [b, t, kv, d]`` with ``h`` a multiple of ``kv`` (query head
    ``i`` reads KV head ``i // (h / kv)``), ``mask: [b, s, t]`` bool. Scores
    ``scale * q.k`` and the softmax are float32; a fully masked row (a padding query)
    comes out as a uniform average instead of NaN. Returns ``[b, s, h * d]`` in v's dtype.
    ``causal=True`` promises that ``mask`` hides every key ``j > i`` from query ``i`` (queries
    and keys the same positions); the result is the same, computed in causal blocks (module
    doc), except for a query that sees no key at all: it averages the keys of its block.
    Such a query (left padding) feeds no real token. ``softcap``: scores ``c tanh(S / c)``
    (Gemma 2). Differentiable in ``q``, ``k`` and ``v``.
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    # Head-major inside: every product is then one batched GEMM over contiguous [s, d] or
    # [s, t] blocks; on the token-major layout XLA's CPU back end ran them 4-5x slower.
    q = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, s, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]
    cap = None if softcap is None else float(softcap)
    out = _grouped_attention(q, k, v, mask, float(scale), bool(causal), cap)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h * d)
