"""Grouped-query attention and its hand-written backward pass against torch autograd."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jqlora.models.attention import attention


def _inputs(b=2, s=7, h=6, kv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, s, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    causal = np.tril(np.ones((s, s), bool))
    valid = np.ones((b, s), bool)
    valid[1, :3] = False  # left padding: rows 0-2 of batch 1 see no key at all
    mask = causal[None] & valid[:, None, :]
    d_out = rng.standard_normal((b, s, h * d)).astype(np.float32)
    return q, k, v, mask, d_out


def _torch_reference(q, k, v, mask, d_out, scale):
    """Softmax attention in torch with KV heads repeated; returns output and gradients."""
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    keys = kt.repeat_interleave(group, dim=2).transpose(1, 2)  # [b, h, t, d]
    values = vt.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = qt.transpose(1, 2) @ keys.transpose(-1, -2) * scale
    scores = scores.masked_fill(~torch.tensor(mask)[:, None], torch.finfo(torch.float32).min)
    out = (torch.softmax(scores, -1) @ values).transpose(1, 2).reshape(d_out.shape)
    out.backward(torch.tensor(d_out))
    return out.detach().numpy(), qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy()


@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (3, 1)])
def test_output_and_gradients_equal_torch(heads):
    h, kv = heads
    q, k, v, mask, d_out = _inputs(h=h, kv=kv)
    scale = 0.35
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, jnp.asarray(mask), scale), q, k, v)
    grads = vjp(jnp.asarray(d_out))
    ref_out, *ref_grads = _torch_reference(q, k, v, mask, d_out, scale)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_bfloat16_stays_close_to_float32_torch():
    q, k, v, mask, d_out = _inputs(s=16, d=32, seed=1)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, jnp.asarray(mask), 0.2), *bf)
    grads = vjp(jnp.asarray(d_out, jnp.bfloat16))
    ref_out, *ref_grads = _torch_reference(q, k, v, mask, d_out, 0.2)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=3e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), want, atol=3e-2 * np.abs(want).max()
        )


@pytest.mark.parametrize("s", [7, 65, 200, 256])
def test_causal_blocks_equal_torch(s):
    """``causal=True`` (queries in blocks, each against the keys up to its end) gives the
    full product's output and gradients, padding included, for sizes that split evenly or not.

    A query that sees no key at all (left padding) averages the keys of its block instead of
    all keys; its output reaches no real token, and in training its cotangent is zero, so it
    is left out of the comparison and given a zero cotangent here.
    """
    q, k, v, mask, d_out = _inputs(s=s, seed=s)
    sees_a_key = mask.any(-1)  # [b, s]
    d_out = d_out * sees_a_key[..., None]
    out, vjp = jax.vjp(
        lambda q, k, v: attention(q, k, v, jnp.asarray(mask), 0.3, causal=True), q, k, v
    )
    grads = vjp(jnp.asarray(d_out))
    ref_out, *ref_grads = _torch_reference(q, k, v, mask, d_out, 0.3)
    np.testing.assert_allclose(
        np.asarray(out)[sees_a_key], ref_out[sees_a_key], rtol=1e-5, atol=1e-5
    )
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_query_blocks_cover_the_causal_triangle():
    from jqlora.models.attention import MIN_QUERY_BLOCK, query_blocks

    assert query_blocks(256, 256, causal=False) == [(0, 256, 256)]
    assert query_blocks(256, 300, causal=True) == [(0, 256, 300)]  # keys from a cache
    assert query_blocks(MIN_QUERY_BLOCK, MIN_QUERY_BLOCK, causal=True) == [(0, 64, 64)]
    assert query_blocks(256, 256, causal=True) == [
        (0, 64, 64),
        (64, 128, 128),
        (128, 192, 192),
        (192, 256, 256),
    ]
    for s in (65, 200, 1000, 4096):
        blocks = query_blocks(s, s, causal=True)
        assert blocks[0][0] == 0 and blocks[-1][1] == s and len(blocks) <= 8
        assert all(b[1] == c[0] for b, c in zip(blocks, blocks[1:], strict=False))
        assert all(end == q1 for _, q1, end in blocks)  # each block sees keys up to its end
