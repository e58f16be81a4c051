"""The LoRA branch's hand-written backward pass and its hashed dropout masks.

The reference is PyTorch + PEFT: a ``peft`` LoRA layer whose dropout module is replaced by
one applying jqlora's mask, run forward and backward by torch autograd. Also checked against
JAX's own autodiff of the plain formula, in float32 and bfloat16, and the masks' rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jqlora.lora import LoraSpec, lora_branch
from jqlora.lora.branch import dropout, dropout_seed, keep_mask, lora_delta

IN, OUT, R = 48, 40, 8


class _MaskDropout(torch.nn.Module):
    def __init__(self, keep: np.ndarray, scale: float):
        super().__init__()
        self.keep, self.scale = torch.from_numpy(keep.copy()), scale

    def forward(self, x):
        return torch.where(self.keep, x * self.scale, 0.0)


def _peft_linear(rate: float):
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(IN, OUT, bias=False))
    cfg = peft.LoraConfig(r=R, lora_alpha=16, lora_dropout=rate, target_modules=["proj"])
    model = peft.get_peft_model(base, cfg).train()
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # B = 0 hides half the test
    return layer


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_forward_and_gradients_match_peft(rate):
    layer = _peft_linear(rate)
    x = np.random.default_rng(0).normal(size=(3, 5, IN)).astype(np.float32)
    cot = np.random.default_rng(1).normal(size=(3, 5, OUT)).astype(np.float32)
    rng = jax.random.key(7)
    if rate:
        keep = np.asarray(keep_mask(dropout_seed(rng), x.shape, rate))
        ones = np.asarray(dropout(jnp.ones(x.shape), dropout_seed(rng), rate))
        scale = float(ones.max())
        assert np.array_equal(ones > 0, keep)
        layer.lora_dropout["default"] = _MaskDropout(keep, scale)
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = layer(xt) - layer.base_layer(xt).detach()  # the branch alone
    out_t.backward(torch.from_numpy(cot))

    w = layer.base_layer.weight.detach().numpy()
    a = jnp.asarray(layer.lora_A["default"].weight.detach().numpy())
    b = jnp.asarray(layer.lora_B["default"].weight.detach().numpy())
    spec = LoraSpec(16 / R, rate)

    def f(x, a, b):
        y = lora_branch(x, {"a": a, "b": b, "spec": spec}, dropout_rng=rng if rate else None)
        return jnp.sum(y * cot)

    got = lora_branch(jnp.asarray(x), {"a": a, "b": b, "spec": spec}, dropout_rng=rng)
    np.testing.assert_allclose(got, out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    dx, da, db = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(x), a, b)
    # x's gradient through the base layer is not part of the branch.
    dx_branch = xt.grad.numpy() - cot.reshape(-1, OUT).dot(w).reshape(x.shape)
    np.testing.assert_allclose(dx, dx_branch, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(da, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db, layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(7, IN), (2, 3, IN)])
def test_custom_backward_equals_autodiff(dtype, shape):
    """The hand-written backward pass against JAX's autodiff of the same forward formula.

    In bfloat16 both run in bfloat16 but round differently (the custom pass accumulates in
    float32), so both are held against autodiff in float32 of the same inputs: the custom
    pass may not be further from it than autodiff in bfloat16 is, plus a little.
    """
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], shape, dtype)
    a = (jax.random.normal(k[1], (R, IN)) * 0.2).astype(dtype)
    b = (jax.random.normal(k[2], (OUT, R)) * 0.2).astype(dtype)
    cot = jax.random.normal(k[3], (*shape[:-1], OUT), dtype)
    seed = dropout_seed(jax.random.key(5))

    def plain(x, a, b, cot):
        return jnp.sum(((dropout(x, seed, 0.25) @ a.T) @ b.T) * jnp.asarray(2.0, x.dtype) * cot)

    def custom(x, a, b):
        return jnp.sum(lora_delta(x, a, b, seed, 2.0, 0.25) * cot)

    got = jax.grad(custom, (0, 1, 2))(x, a, b)
    same_dtype = jax.grad(plain, (0, 1, 2))(x, a, b, cot)
    f32 = [x.astype(jnp.float32) for x in (x, a, b, cot)]
    exact = jax.grad(plain, (0, 1, 2))(*f32)
    for g, low, want in zip(got, same_dtype, exact, strict=True):
        assert g.dtype == low.dtype == dtype
        g, low, want = (np.asarray(v, np.float32) for v in (g, low, want))
        if dtype == jnp.float32:
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
        else:
            scale = np.abs(want).max()
            assert np.abs(g - want).max() <= np.abs(low - want).max() + 1e-2 * scale


def test_masks_have_the_rate_and_are_independent():
    n, rate = 1 << 20, 0.05
    m1 = np.asarray(keep_mask(dropout_seed(jax.random.key(1)), (n,), rate))
    m2 = np.asarray(keep_mask(dropout_seed(jax.random.key(2)), (n,), rate))
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs((1 - m1.mean()) - rate) < 5 * sigma
    # Independent masks: P(both dropped) = rate^2, and neighbours do not correlate.
    assert abs(np.mean(~m1 & ~m2) - rate**2) < 5 * np.sqrt(rate**2 / n)
    assert abs(np.corrcoef(m1[:-1], m1[1:])[0, 1]) < 5 / np.sqrt(n)
    # Inverted dropout keeps the expectation: kept values scaled by 1 / (1 - drop rate).
    ones = np.asarray(dropout(jnp.ones(n), dropout_seed(jax.random.key(1)), rate), np.float64)
    assert np.isclose(ones.max(), 1 / (1 - rate), rtol=1e-7)
