"""Packing: rows of several examples, and a packed batch's loss and LoRA gradients equal to
those of the same examples padded one per row."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqlora
from jqlora.train.data import Example, collate, count_target_tokens
from jqlora.train.packing import PackedStream, collate_packed, pack_rows
from jqlora.train.step import loss_fn

LLAMA = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _examples(lengths, seed=0, vocab=96):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        prompt = int(rng.integers(1, n - 1))
        mask = np.r_[np.zeros(prompt), np.ones(n - prompt)].astype(np.uint8)
        out.append(Example(rng.integers(0, vocab, n).astype(np.int32), mask))
    return out


def test_rows_hold_every_example_once_within_seq_len():
    lengths = [int(n) for n in np.random.default_rng(1).integers(2, 60, 200)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    # first-fit decreasing: no two rows could have been merged
    used = sorted(sum(lengths[i] for i in r) for r in rows)
    assert used[0] + used[1] > 64
    assert len(rows) < 0.7 * len(lengths)


def test_collate_packed_layout():
    exs = _examples([5, 3, 4])
    batch = collate_packed([[exs[0], exs[1]], [exs[2]]], batch_size=3, seq_len=10, pad_id=0)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(batch["input_ids"][0, 5:8], exs[1].input_ids)
    np.testing.assert_array_equal(batch["attention_mask"][1], [1] * 4 + [0] * 6)
    assert not batch["attention_mask"][2].any()  # a missing row is padding
    # each example's own loss mask, its first token cleared
    np.testing.assert_array_equal(batch["loss_mask"][0, 1:5], exs[0].loss_mask[1:])
    assert batch["loss_mask"][0, 5] == 0
    np.testing.assert_array_equal(batch["loss_mask"][0, 6:8], exs[1].loss_mask[1:])
    assert batch["loss_mask"].sum() == count_target_tokens(exs)


def test_stream_visits_every_example_once_per_epoch_and_is_a_function_of_the_index():
    exs = [
        dataclasses.replace(e, input_ids=np.full(len(e), i, np.int32))
        for i, e in enumerate(_examples(list(range(3, 40))))
    ]
    stream = PackedStream(exs, batch_size=2, seq_len=48, pad_id=-1, seed=3)
    for epoch in range(2):
        seen = []
        for k in range(stream.batches_per_epoch):
            b = stream[epoch * stream.batches_per_epoch + k]
            assert b["input_ids"].shape == (2, 48)
            for row, seg in zip(b["input_ids"], b["segment_ids"], strict=True):
                seen += [int(row[seg == s][0]) for s in range(1, seg.max() + 1)]
        assert sorted(seen) == list(range(len(exs)))
    again = PackedStream(exs, batch_size=2, seq_len=48, pad_id=-1, seed=3)
    for i in (0, 5, stream.batches_per_epoch + 1):
        jax.tree.map(np.testing.assert_array_equal, stream[i], again[i])
    assert stream.padding_fraction() < 0.2


@pytest.fixture(scope="module")
def tiny_llama():
    model = jqlora.models.model_for_config(LLAMA, jnp.float32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    lora = jqlora.init_lora(jax.random.key(1), params, jqlora.LoraConfig(r=4, alpha=8))
    # a non-zero B, or the adapters would not change the forward pass
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    lora = jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    return model, params, lora


def test_packed_loss_and_grads_equal_unpacked(tiny_llama):
    """float32: the packed batch (3 rows of 160 with several examples each; causal query
    blocks in attention) against the same examples padded one per row. Measured ~1e-7."""
    model, params, lora = tiny_llama
    exs = _examples([70, 35, 50, 22, 64, 41, 30, 12, 55])
    rows = [[exs[i] for i in r] for r in pack_rows([len(e) for e in exs], 160)]
    assert len(rows) < len(exs) and max(len(r) for r in rows) > 2
    packed = collate_packed(rows, len(rows), 160, pad_id=0)
    unpacked = collate(exs, len(exs), (160,), pad_id=0)
    grad = jax.jit(
        jax.value_and_grad(lambda lora, b: loss_fn(lora, params, b, model=model), has_aux=True)
    )
    (loss_p, aux_p), g_p = grad(lora, packed)
    (loss_u, aux_u), g_u = grad(lora, unpacked)
    assert float(aux_p["tokens"]) == float(aux_u["tokens"]) == count_target_tokens(exs)
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_u), strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.abs(b).max()) + 1e-9
        )
    # Without the block-diagonal mask it would differ. (Positions alone change little here:
    # RoPE scores depend on relative positions; they matter to absolute position embeddings.)
    (loss_x, _), _ = grad(lora, {k: v for k, v in packed.items() if k != "segment_ids"})
    assert abs(float(loss_x) - float(loss_u)) > 1e-2
