"""The gated MLP activation ``act(gate) * up`` and its hand-written backward against torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jqlora.models.common import gated_activation

TORCH = {
    "silu": torch.nn.functional.silu,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}


def _torch(name, gate, up, d_out):
    g, u = (torch.tensor(x, requires_grad=True) for x in (gate, up))
    out = TORCH[name](g) * u
    out.backward(torch.tensor(d_out))
    return out.detach().numpy(), g.grad.numpy(), u.grad.numpy()


@pytest.mark.parametrize("name", sorted(TORCH))
def test_value_and_gradients_equal_torch(name):
    rng = np.random.default_rng(0)
    gate, up, d_out = (rng.standard_normal((5, 24)).astype(np.float32) * 3 for _ in range(3))
    out, vjp = jax.vjp(lambda g, u: gated_activation(name, g, u), gate, up)
    want = _torch(name, gate, up, d_out)
    for got, ref in zip((out, *vjp(jnp.asarray(d_out))), want, strict=True):
        # Saturated tanh-GELU tails differ by float32 rounding of tiny derivatives.
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_bfloat16_is_rounded_once():
    """In bfloat16 the result is float32 arithmetic rounded once: exactly the float32 value
    of the bfloat16 inputs, rounded."""
    rng = np.random.default_rng(1)
    gate, up, d_out = (jnp.asarray(rng.standard_normal((8, 32)), jnp.bfloat16) for _ in range(3))
    out, vjp = jax.vjp(lambda g, u: gated_activation("silu", g, u), gate, up)
    f32 = [np.asarray(x, np.float32) for x in (gate, up, d_out)]
    want = _torch("silu", *f32)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), want[0].astype(jnp.bfloat16))
    for got, ref in zip(vjp(d_out), want[1:], strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=1e-2, atol=1e-2)
