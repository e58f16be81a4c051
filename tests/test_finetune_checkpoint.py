"""Checkpoints: bit-exact for every dtype, atomic under a crash, shape-checked, memory kinds kept."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jqlora.lora.spec import LoraSpec
from jqlora.train import checkpoint as ckpt
from jqlora.train.offload import offload


def state(seed=0, r=2):
    k = jax.random.key(seed)
    lora = {
        "q_proj": {
            "a": jax.random.normal(k, (r, 6)),
            "b": jnp.zeros((5, r)),
            "spec": LoraSpec(2.0, 0.1),
        }
    }
    opt = optax.adamw(1e-3)
    return {
        "lora": lora,
        "opt": opt.init(lora),
        "bf16": jnp.arange(7, dtype=jnp.bfloat16) / 3,
        "codes": jnp.arange(16, dtype=jnp.uint8),
        "rng": jax.random.key(7),
        "raw_rng": jax.random.PRNGKey(3),
        "step": jnp.int32(5),
    }


def same(a, b) -> bool:
    def eq(x, y):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return str(jax.random.key_impl(x)) == str(jax.random.key_impl(y)) and eq(
                jax.random.key_data(x), jax.random.key_data(y)
            )
        x, y = np.asarray(x), np.asarray(y)
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()

    return jax.tree.all(jax.tree.map(eq, a, b)) and jax.tree.structure(a) == jax.tree.structure(b)


def test_round_trip_is_bit_exact(tmp_path):
    tree = state()
    path = ckpt.save_checkpoint(str(tmp_path), 3, tree, {"data_position": 6})
    zeros = jax.tree.map(
        lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.zeros_like(x),
        tree,
    )
    restored, step, meta = ckpt.restore_checkpoint(path, zeros)
    assert step == 3 and meta == {"data_position": 6}
    assert same(restored, tree)
    assert restored["lora"]["q_proj"]["spec"] == LoraSpec(2.0, 0.1)  # static part from the template


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(str(tmp_path), 2, state(0), {})

    def crash(*args, **kwargs):
        raise OSError("disk died")

    # Dies half-way through writing step 4: its arrays are written, its metadata is not.
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(str(tmp_path), 4, state(1), {})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["step_00000002"]  # nothing half-written is left
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000002")
    restored, step, _ = ckpt.restore_checkpoint(ckpt.latest_checkpoint(str(tmp_path)), state(5))
    assert step == 2 and same(restored, state(0))
    # the next save cleans up and publishes normally; only `keep` checkpoints stay
    for s in (4, 6, 8):
        ckpt.save_checkpoint(str(tmp_path), s, state(s), {}, keep=2)
    assert sorted(os.listdir(tmp_path)) == [
        "step_00000006",
        "step_00000008",
    ]  # no half-written leftovers


def test_saving_a_step_again_replaces_it(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 2, state(0), {"v": 1})
    ckpt.save_checkpoint(str(tmp_path), 2, state(1), {"v": 2})
    restored, _, meta = ckpt.restore_checkpoint(ckpt.latest_checkpoint(str(tmp_path)), state(0))
    assert meta == {"v": 2} and same(restored, state(1))


def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), 1, state(r=2), {})
    with pytest.raises(
        ValueError, match=r"\['q_proj'\]\['a'\] \[2, 6\] does not match .* \[4, 6\]"
    ):
        ckpt.restore_checkpoint(path, state(r=4))
    with pytest.raises(ValueError, match="checkpoint has .* arrays, this run's state has"):
        ckpt.restore_checkpoint(path, {"lora": state()["lora"]})


def test_offloaded_optimizer_state_comes_back_in_host_memory(tmp_path):
    lora = state()["lora"]
    opt_state = offload(optax.adamw(1e-3)).init(lora)
    kinds = [x.sharding.memory_kind for x in jax.tree.leaves(opt_state)]
    path = ckpt.save_checkpoint(str(tmp_path), 1, opt_state, {})
    restored, _, _ = ckpt.restore_checkpoint(path, opt_state)
    assert [x.sharding.memory_kind for x in jax.tree.leaves(restored)] == kinds
    assert same(restored, opt_state)


def test_a_checkpoint_of_the_earlier_npz_format_is_refused_with_a_reason(tmp_path):
    old = tmp_path / "step_00000002"
    old.mkdir()
    (old / "meta.json").write_text('{"step": 2, "meta": {}, "leaves": []}')
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(old)
    with pytest.raises(ValueError, match="earlier jqlora .* start the run afresh"):
        ckpt.read_meta(str(old))
    with pytest.raises(ValueError, match="earlier jqlora"):
        ckpt.restore_checkpoint(str(old), state())
