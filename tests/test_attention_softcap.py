"""Soft-capped attention (Gemma 2) and its hand-written backward pass against torch autograd
of transformers' eager formula: ``softmax(c tanh(scale q.k / c))``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jqlora.models.attention import attention


def _torch_reference(q, k, v, mask, d_out, scale, cap):
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    keys = kt.repeat_interleave(group, dim=2).transpose(1, 2)
    values = vt.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.tanh(qt.transpose(1, 2) @ keys.transpose(-1, -2) * scale / cap) * cap
    scores = scores.masked_fill(~torch.tensor(mask)[:, None], torch.finfo(torch.float32).min)
    out = (torch.softmax(scores, -1) @ values).transpose(1, 2).reshape(d_out.shape)
    out.backward(torch.tensor(d_out))
    return out.detach().numpy(), qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy()


@pytest.mark.parametrize("seq", [7, 130])  # one block, and causal blocks
def test_softcapped_output_and_gradients_equal_torch(seq):
    rng = np.random.default_rng(0)
    b, h, kv, d, scale, cap = 2, 4, 2, 8, 0.5, 1.5
    q, k, v = (rng.standard_normal((b, seq, n, d)).astype(np.float32) for n in (h, kv, kv))
    mask = np.tril(np.ones((seq, seq), bool))[None].repeat(b, 0)
    mask[1, :, :3] = False  # left padding: its queries see no key, feed no real token ...
    d_out = rng.standard_normal((b, seq, h * d)).astype(np.float32)
    d_out[1, :3] = 0.0  # ... and get no gradient
    want = _torch_reference(q, k, v, mask, d_out, scale, cap)

    def f(q, k, v):
        return attention(q, k, v, jnp.asarray(mask), scale, causal=True, softcap=cap)

    out, vjp = jax.vjp(f, q, k, v)
    real = mask.any(-1)
    # Measured: ~1e-6 (float32 sums over up to 130 keys).
    np.testing.assert_allclose(np.asarray(out)[real], want[0][real], atol=1e-5, rtol=0)
    for ours, theirs in zip(vjp(jnp.asarray(d_out)), want[1:], strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)
    assert not np.allclose(want[0], _torch_reference(q, k, v, mask, d_out, scale, 1e6)[0])
