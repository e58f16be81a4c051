"""The fused head + cross-entropy loss against torch and transformers: value, gradient,
chunking, and that the full ``[tokens, vocab]`` logits never exist."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from hf_reference import make_tiny, random_ids

import jqlora
from jqlora.train import head_loss, step
from jqlora.train.head_loss import chunk_tokens, fused_next_token_loss


def _torch_loss_and_grad(h, w, targets, weights):
    """``sum w * CE(h @ W.T, y) / max(1, sum w)`` and its gradient in h, by torch autograd."""
    ht = torch.tensor(np.asarray(h, np.float32), requires_grad=True)
    logits = ht.reshape(-1, ht.shape[-1]) @ torch.tensor(np.asarray(w, np.float32)).T
    ce = torch.nn.functional.cross_entropy(
        logits, torch.tensor(np.asarray(targets).reshape(-1), dtype=torch.long), reduction="none"
    )
    wt = torch.tensor(np.asarray(weights, np.float32).reshape(-1))
    loss = (ce * wt).sum() / wt.sum().clamp(min=1.0)
    loss.backward()
    return loss.item(), ht.grad.numpy()


def _case(n_tokens=37, d=24, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((1, n_tokens, d)).astype(np.float32)
    w = (rng.standard_normal((vocab, d)) / np.sqrt(d) * 3).astype(np.float32)
    targets = rng.integers(0, vocab, (1, n_tokens))
    weights = (rng.random((1, n_tokens)) > 0.3).astype(np.float32)
    return h, w, targets, weights


@pytest.mark.parametrize("chunk_elements", [1 << 24, 400])
def test_loss_and_gradient_equal_torch(monkeypatch, chunk_elements):
    # 400 elements of a 50-token vocabulary: chunks of 4 tokens, the last one padded.
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", chunk_elements)
    h, w, targets, weights = _case()
    loss, dh = jax.value_and_grad(fused_next_token_loss)(
        jnp.asarray(h), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(weights)
    )
    ref_loss, ref_dh = _torch_loss_and_grad(h, w, targets, weights)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-5, atol=1e-7)
    # The gradient is computed in the forward pass and scaled by the cotangent.
    dh3 = jax.grad(lambda x: 3.0 * fused_next_token_loss(x, jnp.asarray(w), targets, weights))(
        jnp.asarray(h)
    )
    np.testing.assert_allclose(np.asarray(dh3), 3 * ref_dh, rtol=1e-5, atol=1e-7)


def test_bfloat16_hidden_states_stay_close_to_float32_torch():
    h, w, targets, weights = _case(n_tokens=64, d=64, vocab=300)
    loss, dh = jax.value_and_grad(fused_next_token_loss)(
        jnp.asarray(h, jnp.bfloat16), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(weights)
    )
    ref_loss, ref_dh = _torch_loss_and_grad(h, w, targets, weights)
    assert dh.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(dh, np.float32), ref_dh, atol=2e-2 * np.abs(ref_dh).max())


def test_no_target_gives_zero_loss_and_gradient():
    h, w, targets, _ = _case()
    loss, dh = jax.value_and_grad(fused_next_token_loss)(
        jnp.asarray(h), jnp.asarray(w), targets, jnp.zeros(targets.shape)
    )
    assert float(loss) == 0.0 and not np.asarray(dh).any()


def test_head_weight_is_a_constant():
    h, w, targets, weights = _case()
    dw = jax.grad(fused_next_token_loss, argnums=1)(
        jnp.asarray(h), jnp.asarray(w), targets, weights
    )
    assert not np.asarray(dw).any()
    with pytest.raises(ValueError, match="does not match hidden size"):
        fused_next_token_loss(jnp.asarray(h), jnp.asarray(w[:, :5]), targets, weights)


def test_chunk_size():
    assert chunk_tokens(1024, 49152) == 256  # 256 * 49152 <= 2**24 < 512 * 49152
    assert chunk_tokens(100, 50) == 100
    assert chunk_tokens(1024, 1 << 25) == 1


SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2)
CONFIGS = {
    "llama-tied": lambda: tf.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "llama-untied": lambda: tf.LlamaConfig(**SMALL, num_attention_heads=4),
    "gpt2": lambda: tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4),
    "opt": lambda: tf.OPTConfig(
        vocab_size=96,
        hidden_size=64,
        ffn_dim=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=48,
    ),
}


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_fn_equals_transformers_loss(tmp_path, name, scan_layers):
    """``loss_fn`` (fused head) against transformers' ``labels=`` loss, and its adapter
    gradients against the path through full logits (unrolled layers: with ``scan_layers``
    the scanned layers' gradients are checked against the unrolled ones)."""
    ref = make_tiny(CONFIGS[name](), tmp_path)
    unrolled, params = jqlora.load_hf(str(tmp_path))
    model = unrolled.clone(scan_layers=scan_layers)
    assert step._plain_head_weight(model, params, {}) is not None
    lora = jqlora.init_lora(jax.random.key(0), params, jqlora.LoraConfig(r=4, alpha=8))
    # Non-zero B so that the adapters change the output and get a gradient through A too.
    lora = jax.tree.map(
        lambda x: x + 0.05 if isinstance(x, jax.Array) else x, lora, is_leaf=lambda x: x is None
    )
    ids = random_ids(96, 2, 12)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    labels = np.where(mask > 0, ids, -100)
    labels[:, :3] = -100
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}

    loss, aux = step.loss_fn(jax.tree.map(jnp.zeros_like, lora), params, batch, model=model)
    with torch.no_grad():
        hf_loss = ref(input_ids=torch.tensor(ids).long(), labels=torch.tensor(labels).long()).loss
    np.testing.assert_allclose(float(loss), hf_loss.item(), rtol=1e-5)
    assert int(aux["tokens"]) == int((labels[:, 1:] != -100).sum())

    fused = jax.grad(lambda lo: step.loss_fn(lo, params, batch, model=model)[0])(lora)

    def full_logits_loss(lo):
        logits = unrolled.apply({"params": params, "lora": lo}, batch["input_ids"])
        return step.next_token_loss(logits, batch)[0]

    full = jax.grad(full_logits_loss)(lora)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_full_logits_are_never_built(tmp_path, monkeypatch):
    """The compiled gradient holds no float32 ``[tokens, vocab]`` array, and a quantized or
    adapted head falls back to the full logits."""
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 8 * 96)
    make_tiny(CONFIGS["llama-tied"](), tmp_path)
    model, params = jqlora.load_hf(str(tmp_path))
    lora = jqlora.init_lora(jax.random.key(0), params, jqlora.LoraConfig(r=4, alpha=8))
    batch = {"input_ids": jnp.asarray(random_ids(96, 2, 16))}
    grad = jax.jit(jax.grad(lambda lo: step.loss_fn(lo, params, batch, model=model)[0]))
    hlo = grad.lower(lora).compile().as_text()
    assert not re.search(r"f32\[(32,96|2,16,96)\]", hlo)
    assert re.search(r"f32\[8,96\]", hlo)  # one chunk of 8 tokens

    make_tiny(CONFIGS["llama-untied"](), tmp_path / "untied")
    untied, plain = jqlora.load_hf(str(tmp_path / "untied"))
    assert step._plain_head_weight(untied, plain, {}) is plain["lm_head"]["weight"]
    assert step._plain_head_weight(untied, plain, {"lm_head": {"a": 0}}) is None
    _, quantized = jqlora.load_hf(
        str(tmp_path / "untied"), quantization=jqlora.QuantConfig("nf4", skip_modules=())
    )
    assert step._plain_head_weight(untied, quantized, {}) is None
