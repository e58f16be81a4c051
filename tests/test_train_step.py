"""The QLoRA train step: loss against torch, gradients for the adapters only, learning."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from tiny_lm import TinyLM, init_params, make_lora, quantize_base

from jqlora.lora import merge_lora
from jqlora.train.step import (
    init_train_state,
    loss_fn,
    make_optimizer,
    make_train_step,
    next_token_loss,
)


def _batch(key, b=4, t=16, vocab=64, prompt=3):
    ids = jax.random.randint(key, (b, t), 0, vocab)
    lengths = jnp.array([t, t - 5, t - 1, t - 9][:b])
    attn = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.int32)
    loss_mask = attn * (jnp.arange(t)[None] >= prompt)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def test_loss_equals_torch_cross_entropy_with_ignore_index():
    batch = _batch(jax.random.key(0), vocab=50)
    logits = 4.0 * jax.random.normal(jax.random.key(1), (*batch["input_ids"].shape, 50))
    loss, aux = next_token_loss(logits, batch)

    keep = np.asarray(batch["attention_mask"] * batch["loss_mask"]).astype(bool)
    labels = np.where(keep, np.asarray(batch["input_ids"]), -100)
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(np.asarray(logits)[:, :-1].reshape(-1, 50)),
        torch.from_numpy(labels[:, 1:].reshape(-1).astype(np.int64)),
        ignore_index=-100,
    )
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6)
    assert int(aux["tokens"]) == int((labels[:, 1:] != -100).sum())

    # The same batch given as Hugging Face labels.
    hf = {"input_ids": batch["input_ids"], "labels": jnp.asarray(labels)}
    np.testing.assert_allclose(float(next_token_loss(logits, hf)[0]), ref.item(), rtol=1e-6)
    # bfloat16 logits are upcast before the softmax.
    lo = next_token_loss(logits.astype(jnp.bfloat16), batch)[0]
    np.testing.assert_allclose(float(lo), ref.item(), rtol=2e-2)


def test_batch_errors():
    batch = _batch(jax.random.key(0))
    with pytest.raises(ValueError, match="logits shape"):
        next_token_loss(jnp.zeros((4, 15, 8)), batch)
    with pytest.raises(ValueError, match="not both"):
        next_token_loss(jnp.zeros((4, 16, 64)), {**batch, "labels": batch["input_ids"]})


@functools.cache
def _setup_cached(quantized=True, **kw):
    model = TinyLM(**kw)
    params = init_params(model, jax.random.key(0))
    lora = make_lora(jax.random.key(1), params, init_b=0.05)
    return model, (quantize_base(params) if quantized else params), lora


def _setup(quantized=True, **kw):
    """(model, params, lora); the lora tree is a fresh copy, since train steps donate it."""
    model, params, lora = _setup_cached(quantized, **kw)
    return model, params, jax.tree.map(jnp.copy, lora)


def test_gradients_only_for_lora():
    """Gradients for the adapters only, and the right ones: those of the LoRA branch (its
    hand-written backward pass beside the NF4 base) equal plain autodiff through the merged
    float weights ``dequantize(W) + s b a`` of the same model."""
    model, params, lora = _setup()
    batch = _batch(jax.random.key(2))
    grads = jax.jit(jax.grad(lambda lo: loss_fn(lo, params, batch, model=model)[0]))(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)

    def merged_loss(lo):
        merged = merge_lora(params, lo)  # every 4-bit weight dequantized, adapter folded in
        logits = model.apply({"params": merged}, batch["input_ids"], batch["attention_mask"])
        return next_token_loss(logits, batch)[0]

    expected = jax.jit(jax.grad(merged_loss))(lora)
    for g, want, x in zip(
        jax.tree.leaves(grads), jax.tree.leaves(expected), jax.tree.leaves(lora), strict=True
    ):
        assert g.shape == x.shape and g.dtype == jnp.float32
        scale = float(jnp.abs(want).max())
        assert scale > 0
        # float32 sums in another order: measured worst error 1e-6 of the largest entry
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-5 * scale)


def test_compiled_step_holds_no_base_gradient():
    """A base of plain f32 weights much larger than everything else: had XLA built its
    gradient, the step's temporaries would hold at least the base's size again."""
    model, params, lora = _setup(quantized=False, vocab=32, hidden=128, intermediate=384, layers=3)
    opt = make_optimizer(1e-3)
    state = init_train_state(lora, opt)
    batch = _batch(jax.random.key(2), b=1, t=8, vocab=32)
    compiled = make_train_step(model, opt).lower(state, params, batch).compile()
    mem = compiled.memory_analysis()
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    lora_bytes = sum(x.nbytes for x in jax.tree.leaves(lora))
    assert base_bytes > 20 * lora_bytes
    assert mem.temp_size_in_bytes < 0.25 * base_bytes, (mem, base_bytes)
    # Nor does the optimized HLO compute any f32 value of a decoder weight's shape.
    computed = [
        line
        for line in compiled.as_text().splitlines()
        if re.match(r"\s+(ROOT )?%?\S+ = f32\[(384,128|128,384)\]", line)
        and not re.search(r"= f32\[\S+ (parameter|get-tuple-element|bitcast)\(", line)
    ]
    assert not computed, computed


def test_training_drives_the_loss_down():
    """Learn 'next = previous + 1 (mod vocab)' through adapters on a frozen NF4 base."""
    model, params, lora = _setup(vocab=32, hidden=32, intermediate=64, layers=2)
    opt = make_optimizer(1e-2, max_grad_norm=1.0)
    state = init_train_state(lora, opt)
    step = make_train_step(model, opt, remat="nothing_saveable")
    key = jax.random.key(3)
    losses = []
    for i in range(300):
        start = jax.random.randint(jax.random.fold_in(key, i), (8, 1), 0, 32)
        ids = (start + jnp.arange(12)[None]) % 32
        state, metrics = step(state, params, {"input_ids": ids})
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 300
    assert np.mean(losses[:5]) > 2.5
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:5]), losses[::30]


def _stack_layers(tree, n):
    """An unrolled tree (``layers_0`` ... ``layers_{n-1}``) in the scanned layout (``layers``)."""
    rest = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    return {
        **rest,
        "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f"layers_{i}"] for i in range(n)]),
    }


@pytest.mark.slow  # second tier: jqlora against itself, no outside reference (tests/README.md)
def test_remat_and_scan_compute_the_same_step():
    model, params, lora = _setup(quantized=False)
    batch = _batch(jax.random.key(2))
    opt = optax.adam(1e-2)
    s_ref, m_ref = make_train_step(model, opt, donate=False)(
        init_train_state(lora, opt), params, batch
    )
    stacked = lambda t: _stack_layers(t, model.layers)  # noqa: E731
    for variant in (
        {"remat": "nothing_saveable"},
        {"scan_layers": True, "remat": "nothing_saveable"},
    ):
        scan = variant.get("scan_layers", False)
        p, lo, ref = (
            (stacked(params), stacked(lora), stacked(s_ref.lora))
            if scan
            else (params, lora, s_ref.lora)
        )
        s, m = make_train_step(model, opt, **variant, donate=False)(
            init_train_state(lo, opt), p, batch
        )
        np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-6)
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), s.lora, ref
        )


@pytest.mark.slow  # second tier: jqlora against itself, no outside reference (tests/README.md)
def test_remat_saves_activation_memory():
    """Scanned layers: XLA's CPU scheduler recomputes unrolled checkpointed layers early,
    so only under ``nn.scan`` does remat's saving show in the CPU memory analysis."""
    model, params, lora = _setup(quantized=False, layers=4, scan_layers=True)
    opt = optax.sgd(1e-2)
    state = init_train_state(lora, opt)
    batch = _batch(jax.random.key(2), t=64)

    def temp(**kw):
        step = make_train_step(model, opt, **kw)
        return step.lower(state, params, batch).compile().memory_analysis().temp_size_in_bytes

    assert temp(remat="nothing_saveable") < 0.5 * temp()


def test_bfloat16_compute_keeps_float32_adapters():
    """A bfloat16 step keeps float32 adapters and computes the float32 step's loss and
    gradients to bfloat16 precision. SGD at rate 1 makes the update the gradient itself."""
    model, params, lora = _setup()
    batch = _batch(jax.random.key(2))
    opt = optax.sgd(1.0)
    runs = {
        dtype: make_train_step(model, opt, compute_dtype=dtype, donate=False)(
            init_train_state(lora, opt), params, batch
        )
        for dtype in (jnp.float32, jnp.bfloat16)
    }
    (s32, m32), (s16, m16) = runs[jnp.float32], runs[jnp.bfloat16]
    assert m16["loss"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.lora))
    # measured: loss 1.1e-5 relative; each adapter's gradient 0.9-1.6 % (relative L2 norm),
    # bfloat16's 8-bit mantissa in the activations
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=1e-4)
    for x, new32, new16 in zip(
        jax.tree.leaves(lora), jax.tree.leaves(s32.lora), jax.tree.leaves(s16.lora), strict=True
    ):
        g32, g16 = x - new32, x - new16
        assert float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32)) < 0.15


def test_state_is_donated():
    model, params, lora = _setup()
    opt = make_optimizer(1e-3)
    state = init_train_state(jax.tree.map(jnp.copy, lora), opt)
    step = make_train_step(model, opt)
    new, _ = step(state, params, _batch(jax.random.key(2)))
    assert all(x.is_deleted() for x in jax.tree.leaves(state.opt_state))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new.lora))


def test_adapter_that_does_not_fit_its_layer_is_named_before_compiling():
    model, params, lora = _setup()
    path, entry = next((p, e) for p, e in _adapters(lora))
    entry["a"] = entry["a"][..., :-1]  # one input feature short
    opt = make_optimizer(1e-3)
    step = make_train_step(model, opt)
    with pytest.raises(ValueError, match=re.escape(path)):
        step(init_train_state(lora, opt), params, _batch(jax.random.key(2)))


def _adapters(tree, prefix=""):
    """(dotted path, entry) of every adapter entry in a lora tree."""
    for k, v in tree.items():
        if isinstance(v, dict) and "a" in v:
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from _adapters(v, prefix + k + ".")


def test_train_time_options_are_checked():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, ids, attention_mask=None):
            return jnp.zeros((*ids.shape, 4))

    with pytest.raises(ValueError, match="no 'remat' field"):
        make_train_step(Plain(), optax.sgd(0.1), remat="nothing_saveable")
    with pytest.raises(ValueError, match="unknown remat policy"):
        make_train_step(TinyLM(), optax.sgd(0.1), remat="everything_recomputed")
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_optimizer(max_grad_norm=-1.0)  # 0 turns clipping off


def test_llama_model_remat_field():
    """The Llama family honours ``remat``: same step, rematerialized or not."""
    from jqlora.models import model_for_config

    cfg = dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
    )
    model = model_for_config(cfg)
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))()[
        "params"
    ]
    lora = make_lora(jax.random.key(1), params["model"]["layers"], init_b=0.05)
    lora = {"model": {"layers": lora}}
    opt = optax.sgd(1.0)  # the update is the gradient: compare gradients, not Adam's g / sqrt(v)
    batch = _batch(jax.random.key(2))
    results = [
        make_train_step(model, opt, remat=remat, donate=False)(
            init_train_state(lora, opt), params, batch
        )
        for remat in (None, "nothing_saveable")
    ]
    (s0, m0), (s1, m1) = results
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-5)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), s1.lora, s0.lora
    )


def test_default_compute_dtype_follows_the_hardware(monkeypatch):
    """bfloat16 where bfloat16 matmuls are fast (GPU, TPU, CPUs with AMX), else float32;
    ``JQLORA_COMPUTE_DTYPE`` overrides."""
    from jqlora.train import step as step_module

    monkeypatch.delenv("JQLORA_COMPUTE_DTYPE", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    for has_amx, expected in ((True, jnp.bfloat16), (False, jnp.float32)):
        monkeypatch.setattr(step_module, "cpu_has_amx_bf16", lambda has_amx=has_amx: has_amx)
        assert step_module.default_compute_dtype() == jnp.dtype(expected)
    monkeypatch.setenv("JQLORA_COMPUTE_DTYPE", "bfloat16")
    assert step_module.default_compute_dtype() == jnp.dtype(jnp.bfloat16)
    monkeypatch.setenv("JQLORA_COMPUTE_DTYPE", "float16")
    with pytest.raises(ValueError, match="JQLORA_COMPUTE_DTYPE"):
        step_module.default_compute_dtype()
