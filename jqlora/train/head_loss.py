"""Next-token loss straight from the last hidden states, a chunk of tokens at a time.

For hidden states ``h [n, d]``, a frozen output head ``W [vocab, d]``, targets ``y`` and
weights ``w`` (``N = max(1, sum w)``), chunk by chunk ``c`` of tokens::

    z_c    = h_c @ W.T                                   (float32 accumulation)
    loss   = sum_c sum_t w_t (logsumexp(z_t) - z_t[y_t]) / N
    dh_c   = (w_c / N) (softmax(z_c) - onehot(y_c)) @ W  (computed as in _chunk_loss_and_grad)

The loss is a scalar, so its gradient with respect to ``h`` is known during the forward
pass: it is computed there, chunk by chunk, and the backward pass only scales it by the
incoming cotangent. One head matmul forward and one backward, as with full logits, but
only a ``[chunk, vocab]`` block of logits is ever live instead of ``[n, vocab]`` in float32
plus its softmax and gradient (for SmolLM2 at 1024 tokens: 50 MB instead of ~0.6 GB), and
both matmuls run in the compute dtype with float32 accumulation (the transpose of a
float32-output dot would otherwise run in float32).

``W`` is treated as a constant (it is the frozen base): `fused_next_token_loss` passes it
through ``stop_gradient``, so a derivative with respect to it is zero by definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.kernels.lookup import vary_alike

#: Logit elements per chunk (64 MiB of float32): 256 tokens of a 49152-token vocabulary.
CHUNK_ELEMENTS = 1 << 24


def chunk_tokens(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: the largest power of two with ``chunk * vocab <= CHUNK_ELEMENTS``
    (at least 1), capped at ``n_tokens``."""
    chunk = 1
    while chunk * 2 * vocab <= CHUNK_ELEMENTS:
        chunk *= 2
    return max(1, min(chunk, n_tokens))


def _chunk_loss_and_grad(h, head, targets, weights, inv_count):
    """``(sum_t w_t nll_t, dh)`` of one chunk: ``h [c, d]``, ``targets, weights [c]``.

    With ``e = round(exp(z - max z))`` in the head's dtype and ``S = rowsum(e)``::

        nll = max z + log S - h . W[y]
        dh  = (w / N) ((e @ W) / S - W[y])

    One vocabulary-wide ``exp``, written once in the compute dtype (evaluated twice, for
    logsumexp and for softmax, the chunk took ~25 % longer on a CPU). Softmax's division
    and the one-hot's subtraction move past the matmul (row scales commute with it; the
    one-hot product is a row gather of ``W``), so no float32 ``[c, vocab]`` array besides
    ``z`` is live, and the one-hot part of the gradient is exact instead of rounded. The
    target's logit is recomputed from its row of ``W`` (products exact in float32, summed
    in another order than the matmul's), so ``z`` is dead once ``e`` is written.
    """
    z = jnp.einsum("td,vd->tv", h, head, preferred_element_type=jnp.float32)
    top = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - top).astype(head.dtype)  # z's last read: in float32, e takes its buffer
    # S sums the rounded e the matmul sees: the probabilities behind dh sum to one.
    total = jnp.sum(e.astype(jnp.float32), axis=-1, keepdims=True)
    target_rows = head[targets].astype(jnp.float32)
    target_logit = jnp.sum(h.astype(jnp.float32) * target_rows, axis=-1)
    nll = jnp.where(weights > 0, (top + jnp.log(total))[:, 0] - target_logit, 0.0)
    expected = jnp.einsum("tv,vd->td", e, head, preferred_element_type=jnp.float32) / total
    dh = (expected - target_rows) * (weights * inv_count)[:, None]
    return jnp.sum(nll * weights), dh.astype(h.dtype)


def _loss_and_grad(h, head, targets, weights):
    """``(loss, dh)`` over all tokens, a chunk at a time (tokens padded with weight 0)."""
    n, d = h.shape
    chunk = chunk_tokens(n, head.shape[0])
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    inv_count = 1.0 / jnp.maximum(jnp.sum(weights), 1.0)
    xs = (
        h.reshape(n_chunks, chunk, d),
        targets.reshape(n_chunks, chunk),
        weights.reshape(n_chunks, chunk),
    )

    def body(total, x):
        nll_sum, dh = _chunk_loss_and_grad(x[0], head, x[1], x[2], inv_count)
        return total + nll_sum, dh

    # Under shard_map the carry must vary over the mesh axes its updates vary over.
    zero = vary_alike(jnp.zeros((), jnp.float32), h, head, targets, weights)[0]
    total, dh = jax.lax.scan(body, zero, xs)
    return total * inv_count, dh.reshape(n_chunks * chunk, d)[:n]


@jax.custom_vjp
def _fused_loss(h, head, targets, weights):
    return _loss_and_grad(h, head, targets, weights)[0]


def _fused_loss_fwd(h, head, targets, weights):
    loss, dh = _loss_and_grad(h, head, targets, weights)
    return loss, (dh, head, targets, weights)


def _fused_loss_bwd(res, g):
    dh, head, targets, weights = res
    return (
        (dh * g).astype(dh.dtype),
        jnp.zeros_like(head),
        np.zeros(targets.shape, jax.dtypes.float0),
        jnp.zeros_like(weights),
    )


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def fused_next_token_loss(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array
) -> jax.Array:
    """Mean weighted cross-entropy of ``hidden @ head.T`` against ``targets``.

    ``hidden [..., d]`` (the compute dtype), ``head [vocab, d]`` (cast to hidden's dtype,
    no gradient), ``targets [...]`` integer ids, ``weights [...]`` float32. Equals
    ``sum w * (logsumexp(z) - z[y]) / max(1, sum w)`` with ``z = hidden @ head.T`` in float32,
    never materialising all of ``z`` (see the module doc).
    """
    d = hidden.shape[-1]
    if head.ndim != 2 or head.shape[1] != d:
        raise ValueError(f"head of shape {head.shape} does not match hidden size {d}")
    head = jax.lax.stop_gradient(head).astype(hidden.dtype)
    return _fused_loss(
        hidden.reshape(-1, d),
        head,
        targets.reshape(-1).astype(jnp.int32),
        weights.reshape(-1).astype(jnp.float32),
    )
