"""``scan_layers``: the decoder layers run as one loop over their per-layer params, stacked
inside the step. It must be the unrolled step (checked against transformers and peft in
test_models, test_head_loss and test_lora_models) compiled once per layer body, and with
remat it must hold a fraction of the activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf
from hf_reference import make_tiny, random_ids

import jqlora
from jqlora.train.step import configure_model, init_train_state, make_train_step

# Second tier: the scanned step against the unrolled one, jqlora against itself (the
# scanned logits against transformers stay in test_models.py's fast tier).
pytestmark = pytest.mark.slow

LAYERS = 4


@pytest.fixture(scope="module")
def nf4_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    config = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
    )
    make_tiny(config, d)
    return jqlora.load_hf(d, quantization=jqlora.QuantConfig("nf4", double_quant=True))


def _lora(params, **kw):
    lora = jqlora.init_lora(jax.random.key(0), params, jqlora.LoraConfig(r=4, alpha=8, **kw))
    # Non-zero B: every adapter changes the output and gets a gradient through A too.
    return jax.tree.map(lambda x: x + 0.05, lora)


def _batch(t=16):
    ids = jnp.asarray(random_ids(96, 4, t))
    mask = jnp.ones((4, t), jnp.int32).at[1, :5].set(0)  # left padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def _step(model, params, lora, **kw):
    opt = optax.sgd(1.0)  # the update is the gradient
    step = make_train_step(model, opt, donate=False, **kw)
    return step(init_train_state(lora, opt), params, _batch())


def _scans(model, params, lora) -> bool:
    """Whether the model with ``scan_layers`` runs its layers as a loop for this adapter."""
    model = configure_model(model, scan_layers=True)
    ids = _batch()["input_ids"]
    jaxpr = jax.make_jaxpr(lambda lo: model.apply({"params": params, "lora": lo}, ids))(lora)
    return "scan" in str(jaxpr)


@pytest.mark.parametrize("remat", [None, "nothing_saveable"])
def test_scanned_step_equals_the_unrolled_step(nf4_llama, remat):
    model, params = nf4_llama
    lora = _lora(params)
    assert _scans(model, params, lora)
    (s0, m0), (s1, m1) = (
        _step(model, params, lora, compute_dtype="float32", remat=remat, scan_layers=scan)
        for scan in (False, True)
    )
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-6)
    moved = jax.tree.map(lambda new, old: np.abs(np.asarray(new - old)).max(), s0.lora, lora)
    assert min(jax.tree.leaves(moved)) > 0, "every adapter should have a gradient"
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), s1.lora, s0.lora
    )


def test_scanned_bfloat16_step_is_as_close_to_float32_as_the_unrolled_one(nf4_llama):
    """In bfloat16 the loop rounds its saved values where the unrolled program may fuse them
    away, so the two differ in the last bits; both stay as close to the float32 step (the
    tolerances are ~3x the largest error seen for either)."""
    model, params = nf4_llama
    lora = _lora(params)
    s_ref, m_ref = _step(model, params, lora, compute_dtype="float32")
    for scan in (False, True):
        s, m = _step(model, params, lora, compute_dtype="bfloat16", scan_layers=scan)
        np.testing.assert_allclose(m["loss"], m_ref["loss"], atol=5e-3)
        np.testing.assert_allclose(m["grad_norm"], m_ref["grad_norm"], rtol=2e-2)
        for x, y in zip(jax.tree.leaves(s.lora), jax.tree.leaves(s_ref.lora), strict=True):
            assert np.abs(np.asarray(x - y)).max() <= 0.05 * np.abs(np.asarray(y)).max()


def test_scanned_step_compiles_one_layer_body(nf4_llama):
    model, params = nf4_llama
    lora = _lora(params)
    opt = optax.sgd(1.0)
    state = init_train_state(lora, opt)

    def dots(scan):
        step = make_train_step(model, opt, scan_layers=scan)
        return step.lower(state, params, _batch()).as_text().count("dot_general")

    unrolled, scanned = dots(False), dots(True)
    # Seven projections with an adapter each, forward and backward, in every layer.
    assert unrolled >= LAYERS * 7 * 3
    assert scanned < unrolled / (LAYERS - 1)


def test_layers_that_differ_run_unrolled(nf4_llama):
    """Adapters on some layers only: no common layer body, so the layers run unrolled, with
    the same result."""
    model, params = nf4_llama
    lora = _lora(params)
    del lora["model"]["layers"]["0"]
    assert not _scans(model, params, lora)
    (s0, m0), (s1, m1) = (_step(model, params, lora, scan_layers=scan) for scan in (False, True))
    assert float(m1["loss"]) == float(m0["loss"])
    jax.tree.map(np.testing.assert_array_equal, s1.lora, s0.lora)


def test_scanned_layers_draw_the_unrolled_dropout_masks(nf4_llama):
    """Layer ``i`` draws its masks from ``fold_in(key, i)`` in the loop as unrolled: with
    dropout on, the two steps are still the same step."""
    model, params = nf4_llama
    lora = _lora(params, dropout=0.5)
    opt = optax.sgd(1.0)

    def run(scan, rng):
        step = make_train_step(model, opt, compute_dtype="float32", donate=False, scan_layers=scan)
        return step(init_train_state(lora, opt), params, _batch(), rng=rng)

    (s0, m0), (s1, m1) = (run(scan, jax.random.key(1)) for scan in (False, True))
    s2, _ = run(True, jax.random.key(2))
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    # Other masks move the adapters by ~1e-2; the two programs' float32 rounding by ~1e-6.
    unrolled, scanned, other_key = (jax.tree.leaves(s.lora) for s in (s0, s1, s2))
    moved_by_masks = 0.0
    for x, y, z in zip(scanned, unrolled, other_key, strict=True):
        assert np.abs(np.asarray(x - y)).max() <= 1e-4 * np.abs(np.asarray(y)).max()
        moved_by_masks = max(moved_by_masks, float(np.abs(np.asarray(z - y)).max()))
    assert moved_by_masks > 1e-3
    assert float(run(True, None)[1]["loss"]) != float(m1["loss"])  # dropout did run


def test_remat_under_scan_keeps_a_fraction_of_the_activations(nf4_llama):
    """Unrolled, XLA's CPU scheduler recomputes checkpointed layers early and remat saves
    nothing there; in the loop each layer's recomputation waits for its backward pass."""
    model, params = nf4_llama
    lora = _lora(params)
    opt = optax.sgd(1.0)
    state = init_train_state(lora, opt)
    batch = _batch(t=128)

    def temp(**kw):
        step = make_train_step(model, opt, scan_layers=True, **kw)
        compiled = step.lower(state, params, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp(remat="nothing_saveable") < 0.5 * temp()
