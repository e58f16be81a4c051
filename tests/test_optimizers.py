"""Optimizers by name against their PyTorch references (torch, bitsandbytes), clipping included."""

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jqlora.train.optimizers import OPTIMIZERS, make_optimizer

LR, WD = 1e-2, 0.1


def _torch_reference(name, max_grad_norm):
    def build(params):
        if name == "adamw":
            return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99), eps=1e-6, weight_decay=WD)
        if name == "sgd":
            return torch.optim.SGD(params, lr=LR, weight_decay=WD)
        if name == "lion":  # bitsandbytes' 32-bit Lion, Trainer's "lion_32bit"
            return bnb.optim.Lion(params, lr=LR, betas=(0.9, 0.99), weight_decay=WD)
        raise AssertionError(name)

    return build


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.3])
def test_matches_torch(name, max_grad_norm):
    """Ten updates from the same start on the same gradients, clipped as transformers'
    Trainer clips (``clip_grad_norm_`` over all parameters) when max_grad_norm > 0."""
    rng = np.random.default_rng(0)
    p0 = {"a": rng.normal(size=(8, 12)), "b": rng.normal(size=(5,))}
    p0 = {k: v.astype(np.float32) for k, v in p0.items()}
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
    ref = _torch_reference(name, max_grad_norm)(list(tp.values()))
    opt = make_optimizer(
        LR, name=name, b1=0.9, b2=0.99, eps=1e-6, weight_decay=WD, max_grad_norm=max_grad_norm
    )
    params = jax.tree.map(jnp.asarray, p0)
    state = opt.init(params)
    for _ in range(10):
        grads = {k: (rng.normal(size=v.shape) * 3).astype(np.float32) for k, v in p0.items()}
        for k, p in tp.items():
            p.grad = torch.from_numpy(grads[k].copy())
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), max_grad_norm)
        ref.step()
        u, state = opt.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = jax.tree.map(jnp.add, params, u)
    for k, p in tp.items():
        # float32 both sides; ~1e-7 measured. Lion's sign() makes it exact or off by 2 lr.
        np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), atol=1e-5)
    moved = max(float(np.abs(np.asarray(params[k]) - p0[k]).max()) for k in p0)
    assert moved > 5 * LR * 0.1  # the parameters moved: the comparison is not vacuous


def test_every_optimizer_descends():
    """Each named optimizer lowers a quadratic (adafactor and adamw_8bit have their own
    references elsewhere or none in torch: this checks they are wired up)."""
    target = jnp.linspace(-1, 1, 5000).reshape(50, 100)
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)  # noqa: E731
    for name in OPTIMIZERS:
        opt = make_optimizer(1e-2, name=name, max_grad_norm=0)
        params = {"w": jnp.zeros_like(target)}
        state = opt.init(params)
        for _ in range(20):
            u, state = opt.update(jax.grad(loss)(params), state, params)
            params = jax.tree.map(jnp.add, params, u)
        assert float(loss(params)) < 0.9 * float(loss({"w": jnp.zeros_like(target)})), name


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; expected one of adamw"):
        make_optimizer(name="adam")
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        make_optimizer(max_grad_norm=-0.1)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        make_optimizer(weight_decay=-1)
