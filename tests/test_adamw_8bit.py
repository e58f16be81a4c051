"""8-bit AdamW: code maps and codes against bitsandbytes, updates against a float64 reference
of the same algorithm and against bitsandbytes' own AdamW8bit, a training run against AdamW,
and the state's size."""

import bitsandbytes as bnb
import bitsandbytes.backends.cpu.ops as bnb_cpu_ops
import bitsandbytes.functional as bnbF
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jqlora.quant.codebooks import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, dynamic_map
from jqlora.train.adamw_8bit import (
    BLOCKSIZE,
    QuantizedMoment,
    dequantize_blockwise,
    quantize_blockwise,
    scale_by_adam_8bit,
)
from jqlora.train.offload import memory_kinds, offload
from jqlora.train.optimizers import make_optimizer


def _spread(rng, shape, signed):
    """Values over eight decades, as optimizer moments are."""
    x = 10.0 ** rng.uniform(-9, -1, shape)
    return (x * rng.choice([-1, 1], shape) if signed else x).astype(np.float32)


def test_dynamic_maps_are_bitsandbytes():
    for signed in (True, False):
        np.testing.assert_array_equal(
            dynamic_map(signed), bnbF.create_dynamic_map(signed=signed).numpy()
        )
    np.testing.assert_array_equal(dynamic_map(True), DYNAMIC_SIGNED)
    np.testing.assert_array_equal(dynamic_map(False), DYNAMIC_UNSIGNED)


def _bnb_nearest(x: np.ndarray, book: np.ndarray):
    """bitsandbytes' quantize_blockwise by nearest code (its path for float64 input; the
    float32 CPU library path rounds onto a 65,536-step grid first)."""
    q, absmax = torch.ops.bitsandbytes.quantize_blockwise(
        torch.from_numpy(x.astype(np.float64)), torch.from_numpy(book), BLOCKSIZE
    )
    return q.numpy(), absmax.numpy()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1000,), (16, 100), (256,), (3, 5)])
def test_codes_are_bitsandbytes_quantize_blockwise(signed, shape):
    book = DYNAMIC_SIGNED if signed else DYNAMIC_UNSIGNED
    x = _spread(np.random.default_rng(sum(shape) + signed), shape, signed)
    q = quantize_blockwise(jnp.asarray(x), book)
    codes, absmax = _bnb_nearest(x, book)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    assert len(np.unique(codes)) > min(80, x.size // 3)  # the spread reaches much of the map
    np.testing.assert_array_equal(
        np.asarray(dequantize_blockwise(q, book)),
        (book[codes].reshape(-1) * np.repeat(absmax, BLOCKSIZE)[: x.size]).reshape(shape),
    )


def test_zero_block_decodes_to_zero():
    for book in (DYNAMIC_SIGNED, DYNAMIC_UNSIGNED):
        q = quantize_blockwise(jnp.zeros(300), book)
        assert float(jnp.abs(dequantize_blockwise(q, book)).max()) == 0.0


# ----------------------------------------------------------------------------- the update


def _nearest64(x, absmax, book):
    scaled = np.clip(x * (1.0 / np.maximum(absmax, 1e-38)), -1, 1)
    mids = (book[:-1].astype(np.float64) + book[1:]) / 2
    return np.searchsorted(mids, scaled, side="left")


def _reference_step(g, m_q, v_q, t, b1, b2, eps):
    """One update of the module doc's algorithm in float64 numpy, from the stored 8-bit
    moments (codes, absmax) of one leaf: ``(u, (m codes, m absmax), (v codes, v absmax))``."""
    g = g.astype(np.float64).reshape(-1)
    n = g.size

    def decode(q, book):
        codes, absmax = (np.asarray(a) for a in q)
        return book[codes.reshape(-1)].astype(np.float64) * np.repeat(absmax, BLOCKSIZE)[:n]

    def encode(x, book):
        pad = np.pad(x, (0, -n % BLOCKSIZE)).reshape(-1, BLOCKSIZE)
        absmax = np.abs(pad).max(axis=1)
        return _nearest64(pad, absmax[:, None], book).reshape(-1)[:n], absmax

    m = b1 * decode(m_q, DYNAMIC_SIGNED) + (1 - b1) * g
    v = b2 * decode(v_q, DYNAMIC_UNSIGNED) + (1 - b2) * g * g
    u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return u, encode(m, DYNAMIC_SIGNED), encode(v, DYNAMIC_UNSIGNED)


def test_update_equals_float64_reference_step_by_step():
    """Each step starts the reference from jqlora's stored state, so an error cannot hide in
    accumulated drift. float32 against float64: updates within 1e-6; a code may
    differ by one where the float64 value sits within float32 rounding of a midpoint."""
    b1, b2, eps = 0.9, 0.99, 1e-8
    rng = np.random.default_rng(0)
    params = {"a": jnp.zeros((16, 100)), "b": jnp.zeros((300,))}
    opt = scale_by_adam_8bit(b1, b2, eps, min_8bit_size=0)
    state = opt.init(params)
    update = jax.jit(opt.update)
    mismatches, total = 0, 0
    for t in range(1, 31):
        grads = {k: jnp.asarray(_spread(rng, p.shape, True) * 1e3) for k, p in params.items()}
        u, new = update(grads, state)
        for k in params:
            ref_u, ref_m, ref_v = _reference_step(
                np.asarray(grads[k]), state.mu[k], state.nu[k], t, b1, b2, eps
            )
            # Adam's update is O(1); float32 rounding of m (a difference) leaves ~1e-7.
            np.testing.assert_allclose(np.asarray(u[k]).reshape(-1), ref_u, rtol=1e-5, atol=1e-6)
            for got, (codes, absmax) in ((new.mu[k], ref_m), (new.nu[k], ref_v)):
                np.testing.assert_allclose(np.asarray(got.absmax), absmax, rtol=1e-6)
                diff = np.asarray(got.codes).reshape(-1).astype(int) - codes
                assert np.abs(diff).max() <= 1
                mismatches, total = mismatches + np.count_nonzero(diff), total + diff.size
        state = new
    assert int(state.count) == 30
    assert mismatches <= 1e-3 * total, (mismatches, total)


def _patched_bnb_quantizer(monkeypatch):
    """bitsandbytes' CPU 8-bit optimizer, storing its states by nearest code (its portable and
    CUDA behaviour) instead of its CPU library's grid lookup."""

    def nearest(A, code, absmax_out, out_uint8, blocksize):
        out, absmax = torch.ops.bitsandbytes.quantize_blockwise(A.double(), code, blocksize)
        out_uint8.copy_(out)
        absmax_out.copy_(absmax)

    monkeypatch.setattr(bnb_cpu_ops, "_quant_blockwise_fp32_direct", nearest)


def test_matches_bitsandbytes_adamw8bit(monkeypatch):
    """jqlora's adamw_8bit and bitsandbytes' AdamW8bit (CPU, nearest-code storage) from the same
    start on the same gradients: parameters agree to float32 rounding over 20 steps."""
    _patched_bnb_quantizer(monkeypatch)
    lr, wd = 1e-2, 0.1
    rng = np.random.default_rng(1)
    p0 = {
        "a": rng.normal(size=(16, 96)).astype(np.float32),
        "b": rng.normal(size=(700,)).astype(np.float32),
    }
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
    ref = bnb.optim.AdamW8bit(
        list(torch_params.values()),
        lr=lr,
        betas=(0.9, 0.995),
        eps=1e-8,
        weight_decay=wd,
        min_8bit_size=0,
    )
    opt = make_optimizer(
        lr, name="adamw_8bit", b1=0.9, b2=0.995, weight_decay=wd, max_grad_norm=0, min_8bit_size=0
    )
    params = jax.tree.map(jnp.asarray, p0)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for _ in range(20):
        grads = {
            k: rng.normal(size=v.shape).astype(np.float32) * rng.uniform(0.01, 10)
            for k, v in p0.items()
        }
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(grads[k])
        ref.step()
        u, state = update(jax.tree.map(jnp.asarray, grads), state, params)
        params = jax.tree.map(lambda p, d: p + d, params, u)
        for k, p in torch_params.items():
            # ~1e-6 measured; a flipped code near a midpoint moves an update by ~1e-4 lr.
            np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), atol=1e-5)
        for k in p0:
            st = ref.state[torch_params[k]]
            mu = state[0].mu[k]
            agree = np.mean(np.asarray(mu.codes) == st["state1"].numpy())
            assert agree > 0.99, agree


def test_composes_with_offload():
    """offload(adamw_8bit): the 8-bit state lives in host memory between jitted updates, and
    the updates are bit-identical to those without offload."""
    rng = np.random.default_rng(2)
    params = {"a": jnp.asarray(rng.normal(size=(8, 640)), jnp.float32), "b": jnp.zeros((5,))}
    grads = [
        {k: jnp.asarray(rng.normal(size=v.shape) * (i + 1), jnp.float32) for k, v in params.items()}
        for i in range(3)
    ]
    runs = []
    for wrap in (lambda o: o, offload):
        opt = wrap(make_optimizer(1e-2, name="adamw_8bit", min_8bit_size=1000))
        state, p = opt.init(params), params
        update = jax.jit(opt.update)  # (donating an offloaded state to a bare update aborts XLA)
        for g in grads:
            u, state = update(g, state, p)
            p = jax.tree.map(jnp.add, p, u)
        runs.append((p, state))
    assert memory_kinds(runs[1][1]) == {"pinned_host"}
    mu = runs[1][1][1][0].mu  # chain: (clip, (adam8, decay, lr)) -> the 8-bit moments
    assert isinstance(mu["a"], QuantizedMoment) and mu["a"].codes.dtype == jnp.uint8
    assert not isinstance(mu["b"], QuantizedMoment)  # below min_8bit_size: float32
    jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])


# ----------------------------------------------------------------------------- a training run


def _sequence_batches(n, b=4, t=16, vocab=64):
    """A learnable toy language: x[i + 1] = 5 x[i] + 3 (mod vocab)."""
    rng = np.random.default_rng(0)
    for _ in range(n):
        start = rng.integers(0, vocab, (b, 1))
        yield {
            "input_ids": jnp.asarray(
                (start * 5 ** np.arange(t) + 3 * np.arange(t)) % vocab, jnp.int32
            )
        }


def test_training_run_follows_adamw_and_state_is_2_bytes_per_parameter():
    """100 steps on a tiny model: adamw_8bit's loss curve stays within the noise of AdamW's
    (the spread between two AdamW runs from different adapter inits), and XLA's compiled
    step holds 6 bytes per adapter parameter less (minus 8 per block of 256) of state, as
    estimate_memory counts."""
    from tiny_lm import TinyLM, init_params, llama_config, make_lora

    from jqlora.lora import LoraConfig
    from jqlora.memory import estimate_memory
    from jqlora.train.step import init_train_state, make_train_step

    model = TinyLM()
    params = init_params(model, jax.random.key(0))
    batches = list(_sequence_batches(100))
    curves, arg_bytes, steps = {}, {}, {}
    for name, key in (("adamw", 1), ("adamw", 2), ("adamw_8bit", 1)):
        opt = make_optimizer(1e-2, name=name, min_8bit_size=0)
        state = init_train_state(make_lora(jax.random.key(key), params), opt)
        if name not in steps:
            steps[name] = make_train_step(model, opt).lower(state, params, batches[0]).compile()
            arg_bytes[name] = steps[name].memory_analysis().argument_size_in_bytes
        step = steps[name]
        losses = []
        for batch in batches:
            state, metrics = step(state, params, batch)
            losses.append(float(metrics["loss"]))
        curves[name, key] = np.asarray(losses)
    adamw, other_init, eight_bit = curves["adamw", 1], curves["adamw", 2], curves["adamw_8bit", 1]
    assert adamw[-10:].mean() < 0.85 * adamw[0]  # it learns
    noise = np.abs(adamw - other_init)[-10:].mean()
    # measured: 8-bit vs AdamW 0.008, AdamW vs AdamW from another init 0.107
    assert np.abs(adamw - eight_bit)[-10:].mean() < 0.25 * noise, (
        noise,
        adamw[-10:],
        eight_bit[-10:],
    )

    lora = make_lora(jax.random.key(1), params)
    n = sum(x.size for x in jax.tree.leaves(lora))
    blocks = sum(-(-x.size // BLOCKSIZE) for x in jax.tree.leaves(lora))
    saved = 8 * n - (2 * n + 8 * blocks)
    assert arg_bytes["adamw"] - arg_bytes["adamw_8bit"] == saved
    # estimate_memory counts the same state for the same adapters (r=4 on every linear layer)
    estimates = {
        name: estimate_memory(
            llama_config(model),
            LoraConfig(r=4),
            optimizer=make_optimizer(name=name, min_8bit_size=0),
        )
        for name in ("adamw", "adamw_8bit")
    }
    assert estimates["adamw"].lora_params == n
    state_bytes = {k: e.qlora.device["optimizer state"] for k, e in estimates.items()}
    assert state_bytes["adamw"] == 8 * n + 4  # + the step count
    assert state_bytes["adamw_8bit"] == 2 * n + 8 * blocks + 4
