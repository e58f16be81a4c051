"""Host-offloaded optimizer state: same arithmetic, state in pinned host memory between steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tiny_lm import TinyLM, init_params, make_lora, quantize_base

from jqlora.train.offload import memory_kinds, offload
from jqlora.train.step import init_train_state, make_optimizer, make_train_step


def _batches(n, b=4, t=12, vocab=64):
    key = jax.random.key(7)
    for i in range(n):
        ids = jax.random.randint(jax.random.fold_in(key, i), (b, t), 0, vocab)
        yield {
            "input_ids": ids,
            "loss_mask": (jnp.arange(t) >= 2)[None].repeat(b, 0).astype(jnp.int32),
        }


def test_offloaded_run_is_bit_identical():
    model = TinyLM()
    params = init_params(model, jax.random.key(0))
    lora = make_lora(jax.random.key(1), params, init_b=0.05)
    params = quantize_base(params)
    runs = {}
    for name, opt in (("plain", make_optimizer(1e-2)), ("offload", offload(make_optimizer(1e-2)))):
        state = init_train_state(jax.tree.map(jnp.copy, lora), opt)
        step = make_train_step(model, opt)
        losses = []
        for batch in _batches(6):
            state, metrics = step(state, params, batch)
            losses.append(np.asarray(metrics["loss"]))
            if name == "offload":
                assert memory_kinds(state.opt_state) == {"pinned_host"}
                assert memory_kinds(state.lora) == {"device"}
        runs[name] = (losses, state)
    (l0, s0), (l1, s1) = runs["plain"], runs["offload"]
    assert len(set(map(float, l0))) > 1  # the loss moved
    np.testing.assert_array_equal(np.array(l0), np.array(l1))
    jax.tree.map(np.testing.assert_array_equal, s0.lora, s1.lora)
    jax.tree.map(np.testing.assert_array_equal, s0.opt_state, s1.opt_state)


def test_offloaded_state_is_donated_not_copied():
    """The compiled step reads the state from host memory and writes it back in place."""
    model = TinyLM()
    params = init_params(model, jax.random.key(0))
    opt = offload(optax.adam(1e-3))
    state = init_train_state(make_lora(jax.random.key(1), params), opt)
    step = make_train_step(model, opt)
    batch = next(_batches(1))
    hlo = step.lower(state, params, batch).compile().as_text()
    assert "S(5)" in hlo  # host memory space annotations in the compiled module
    new, _ = step(state, params, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.opt_state))
    assert memory_kinds(new.opt_state) == {"pinned_host"}


def test_offload_outside_jit():
    opt = offload(optax.adam(0.1))
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    assert memory_kinds(state) == {"pinned_host"}
    updates, state = opt.update({"w": jnp.ones(3)}, state, params)
    assert memory_kinds(state) == {"pinned_host"}
    ref_updates, _ = optax.adam(0.1).update(
        {"w": jnp.ones(3)}, optax.adam(0.1).init(params), params
    )
    np.testing.assert_array_equal(updates["w"], ref_updates["w"])


def test_offload_wraps_gradient_accumulation():
    """optax.MultiSteps (what a loop uses for gradient accumulation) offloads like any optimizer."""
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = [{"w": jnp.full((2, 3), float(i + 1))} for i in range(6)]

    def run(opt):
        @jax.jit
        def update(g, s, p):
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        p, s = params, opt.init(params)
        for g in grads:
            p, s = update(g, s, p)
        return p, s

    inner = optax.MultiSteps(optax.adamw(0.1), every_k_schedule=3)
    p0, _ = run(inner)
    p1, s1 = run(offload(optax.MultiSteps(optax.adamw(0.1), every_k_schedule=3)))
    np.testing.assert_array_equal(p0["w"], p1["w"])
    assert memory_kinds(s1) == {"pinned_host"}
