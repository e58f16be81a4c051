"""Faults during `jqlora finetune`: NaN/inf steps (stop or skip) and a disk that fills up.

A NaN is injected at known micro-batches: the data stream gets a ``poison`` entry (0 or NaN)
and the loss is multiplied by ``1 + poison``, which is bit-exact where the poison is 0, so
poisoned runs compare bit for bit with a clean run of the same program.
"""

from __future__ import annotations

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from checkpoint_files import checkpoint_arrays, disk_bytes, small_disk
from finetune_tiny import chat_records, make_tiny_model_dir, texts_of, write_jsonl
from tiny_lm import TinyLM, init_params, make_lora, quantize_base

from jqlora.app import loop, nonfinite
from jqlora.app.cli import main
from jqlora.train import checkpoint as ckpt
from jqlora.train import data as data_lib
from jqlora.train import step as step_lib
from jqlora.train.offload import memory_kinds, offload
from jqlora.train.step import init_train_state, make_optimizer, make_train_step

# The CLI's defaults where the CLI has no flag (dropout, warm-up, clipping) so that a CLI run
# and a loop.finetune run with RUN are the same training.
RUN = dict(batch_size=4, seq_len=32, lr=5e-3, lora_r=2, lora_alpha=4, eval_every=2)
QUIET = dict(sample=False, progress=False, log=lambda *a: None)


def cli_args(model_dir, data, out, steps, *extra):
    flags = {"batch-size": 4, "seq-len": 32, "lr": 5e-3, "lora-r": 2, "lora-alpha": 4}
    flags["eval-every"] = 2
    argv = ["finetune", "--model", model_dir, "--data", data, "--out", str(out)]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    return argv + ["--steps", str(steps), *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    records = chat_records(24)
    model_dir = make_tiny_model_dir(root / "model", texts_of(records), hidden=32, layers=1)
    return model_dir, write_jsonl(root / "data.jsonl", records)


@pytest.fixture
def keep_all_checkpoints(monkeypatch):
    """Every checkpoint of a run stays, so that the state after each step can be compared."""
    save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: save(*a, **{**k, "keep": 0}))


def poison(monkeypatch, bad_micro_batches):
    """NaN loss (and gradients) at the given micro-batch indices of every run that follows."""
    bad = set(bad_micro_batches)
    getitem, loss_fn = data_lib.BatchStream.__getitem__, step_lib.loss_fn

    def poisoned_batch(self, index):
        return {**getitem(self, index), "poison": np.float32(np.nan if index in bad else 0.0)}

    def poisoned_loss(lora, params, batch, **kwargs):
        loss, aux = loss_fn(lora, params, batch, **kwargs)
        return (loss * (1.0 + batch["poison"]) if "poison" in batch else loss), aux

    monkeypatch.setattr(data_lib.BatchStream, "__getitem__", poisoned_batch)
    monkeypatch.setattr(step_lib, "loss_fn", poisoned_loss)


def arrays(path) -> dict[str, np.ndarray]:
    """A checkpoint's leaves by tree path."""
    return checkpoint_arrays(path)


def step_dir(out, step) -> str:
    return os.path.join(out, "checkpoints", f"step_{step:08d}")


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def all_finite_file(path) -> bool:
    from safetensors.numpy import load_file

    return all(np.isfinite(t).all() for t in load_file(path).values())


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    """An uninterrupted, finite 5-step run that keeps a checkpoint of every step."""
    model_dir, data = tiny
    out = str(tmp_path_factory.mktemp("clean"))
    with pytest.MonkeyPatch.context() as mp:
        save = ckpt.save_checkpoint
        mp.setattr(ckpt, "save_checkpoint", lambda *a, **k: save(*a, **{**k, "keep": 0}))
        poison(mp, [])
        loop.finetune(model=model_dir, data=data, out=out, steps=5, save_every=1, **RUN, **QUIET)
    return out


# --- the train step's guard -------------------------------------------------------------


def _batches(n, b=4, t=12, vocab=64):
    key = jax.random.key(7)
    for i in range(n):
        ids = jax.random.randint(jax.random.fold_in(key, i), (b, t), 0, vocab)
        yield {"input_ids": ids, "loss_mask": (jnp.arange(t) >= 2)[None].repeat(b, 0)}


@pytest.mark.parametrize("kind", ["plain", "offload", "accumulate"])
def test_guarded_step_is_bit_identical_and_discards_a_nan_update(kind):
    model = TinyLM(layers=1)
    params = init_params(model, jax.random.key(0))
    lora = make_lora(jax.random.key(1), params, init_b=0.05)
    params = quantize_base(params)
    nan_params = jax.tree.map(lambda x: x * np.nan if x.dtype == jnp.float32 else x, params)
    make = {
        "plain": lambda: make_optimizer(1e-2),
        "offload": lambda: offload(make_optimizer(1e-2)),
        "accumulate": lambda: optax.MultiSteps(make_optimizer(1e-2), every_k_schedule=2),
    }[kind]
    runs = []
    for guard in (False, True):
        opt = make()
        state = init_train_state(jax.tree.map(jnp.copy, lora), opt)
        step = make_train_step(model, opt, skip_nonfinite=guard)
        for batch in _batches(4):
            state, m = step(state, params, batch)
        runs.append((state, m))
    (plain, m0), (guarded, m1) = runs
    assert not bool(m1["skipped"]) and float(m0["loss"]) == float(m1["loss"])
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(guarded), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

    before = jax.tree.map(np.asarray, guarded)
    after, m = step(guarded, nan_params, next(_batches(1)))
    assert np.isnan(float(m["loss"])) and bool(m["skipped"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert a.tobytes() == np.asarray(b).tobytes()
    if kind == "offload":
        assert memory_kinds(after.opt_state) == {"pinned_host"}
    # skip=True discards a finite update too (the rest of an accumulated non-finite one)
    again, m = step(after, params, next(_batches(1)), skip=jnp.bool_(True))
    assert bool(m["skipped"]) and np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(again), strict=True):
        assert a.tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, None])
@pytest.mark.parametrize("jit", [True, False])
def test_all_finite_equals_numpy(bad, jit):
    """`all_finite` (shape groups, summed ``x * 0``) against numpy's ``isfinite`` per leaf: one
    bad element anywhere in a tree of shared shapes, mixed dtypes and an integer leaf."""
    rng = np.random.default_rng(0)
    tree = {
        "a": [rng.normal(size=(3, 5)).astype(np.float32) * 1e38 for _ in range(4)],
        "b": [rng.normal(size=(7,)).astype(jnp.bfloat16) for _ in range(3)],
        "c": np.arange(6, dtype=np.int32),
    }
    check = jax.jit(step_lib.all_finite) if jit else step_lib.all_finite
    for leaf in [] if bad is None else [("a", 2), ("b", 0)]:
        poisoned = jax.tree.map(np.copy, tree)
        poisoned[leaf[0]][leaf[1]].reshape(-1)[-1] = bad
        want = all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(poisoned))
        assert not want and bool(check(jax.tree.map(jnp.asarray, poisoned))) is want
    assert bool(check(jax.tree.map(jnp.asarray, tree))) is True  # 1e38-sized values: no overflow
    assert bool(check({})) is True


def test_guard_discards_a_non_finite_optimizer_state_behind_a_finite_loss():
    """Loss and gradient norm finite, the optimizer's new state not: the update is discarded."""
    model = TinyLM(layers=1)
    params = init_params(model, jax.random.key(0))
    lora = make_lora(jax.random.key(1), params, init_b=0.05)
    params = quantize_base(params)

    def update(grads, state, params=None):  # SGD whose state turns inf on its second update
        count = state + 1
        return jax.tree.map(lambda g: -1e-2 * g, grads), jnp.where(count == 2, jnp.inf, count)

    opt = optax.GradientTransformation(lambda p: jnp.zeros((), jnp.float32), update)
    state = init_train_state(jax.tree.map(jnp.copy, lora), opt)
    step = make_train_step(model, opt, skip_nonfinite=True)
    batches = _batches(2)
    state, m = step(state, params, next(batches))
    assert not bool(m["skipped"])
    before = jax.tree.map(np.asarray, state)
    after, m = step(state, params, next(batches))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert bool(m["skipped"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert a.tobytes() == np.asarray(b).tobytes()


# --- on_nonfinite in finetune -------------------------------------------------------------


@pytest.mark.slow  # finetune runs (the `clean` fixture too)
def test_skip_discards_the_step_logs_it_and_goes_on(tiny, clean, tmp_path, monkeypatch):
    model_dir, data = tiny
    out = str(tmp_path / "skip")
    poison(monkeypatch, [2])  # micro-batch 2 is step 3
    save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: save(*a, **{**k, "keep": 0}))
    logged = []
    result = loop.finetune(
        model=model_dir, data=data, out=out, steps=5, save_every=1, on_nonfinite="skip", **RUN,
        **{**QUIET, "log": logged.append},
    )  # fmt: skip
    assert result.skipped_steps == [3]
    assert any("step 3: the loss is nan; its update was skipped" in line for line in logged)
    # After the skipped step 3 the state (adapter, optimizer, step count) is that of step 2.
    assert same_bits(arrays(step_dir(out, 3)), arrays(step_dir(clean, 2)))
    assert same_bits(arrays(step_dir(out, 2)), arrays(step_dir(clean, 2)))
    assert not same_bits(arrays(step_dir(out, 4)), arrays(step_dir(out, 3)))  # training went on
    got, want = metrics(out), metrics(clean)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]
    assert got[2]["skipped"] is True and got[2]["reason"] == "the loss is nan"
    assert "loss" not in got[2]
    assert [m["loss"] for m in got[:2]] == [m["loss"] for m in want[:2]]
    assert all_finite_file(os.path.join(out, "adapter_model.safetensors"))
    for s in range(1, 6):
        assert all(np.isfinite(a).all() for a in arrays(step_dir(out, s)).values())
    assert os.path.exists(os.path.join(out, "loss.png"))


@pytest.mark.slow
def test_skip_with_accumulation_discards_the_whole_update(tiny, tmp_path, monkeypatch):
    """grad_accum=2: a NaN in the second micro-batch of step 3 discards step 3's whole update."""
    model_dir, data = tiny
    save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: save(*a, **{**k, "keep": 0}))
    runs = {}
    for name, bad in (("clean", []), ("nan", [5])):
        poison(monkeypatch, bad)
        out = runs[name] = str(tmp_path / name)
        loop.finetune(
            model=model_dir, data=data, out=out, steps=4, grad_accum=2, save_every=1, on_nonfinite="skip",
            **RUN, **QUIET,
        )  # fmt: skip
    after_skip, before = arrays(step_dir(runs["nan"], 3)), arrays(step_dir(runs["clean"], 2))
    assert after_skip.keys() == before.keys()
    for k in before:
        if "acc_grads" in k:  # emptied again: equal values (the sign of a zero may differ)
            assert np.array_equal(after_skip[k], before[k]), k
        else:  # adapter, moments, counters and rng: bit for bit
            assert after_skip[k].tobytes() == before[k].tobytes(), k
    assert [m.get("skipped", False) for m in metrics(runs["nan"])] == [False, False, True, False]
    assert all_finite_file(os.path.join(runs["nan"], "adapter_model.safetensors"))


@pytest.mark.slow
def test_stop_names_the_step_keeps_the_last_good_state_and_writes_no_adapter(
    tiny, clean, tmp_path, monkeypatch, capsys
):
    model_dir, data = tiny
    out = tmp_path / "stop"
    poison(monkeypatch, [2])
    assert main(cli_args(model_dir, data, out, 5, "--save-every", "4")) == 1
    err = capsys.readouterr().err
    kept = step_dir(str(out), 2)
    assert "jqlora finetune: error: step 3: the loss is nan; training stopped" in err
    assert f"checkpoint {kept} holds the last good state" in err and "Traceback" not in err
    assert "--on-nonfinite skip" in err
    # The state of step 2 was saved (the regular save would have come at step 4), and only it.
    assert os.listdir(out / "checkpoints") == ["step_00000002"]
    assert same_bits(arrays(kept), arrays(step_dir(clean, 2)))
    assert not os.path.exists(out / "adapter_model.safetensors")
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and metrics(out)[2]["skipped"]

    # Resuming with skip goes past the bad step; metrics hold each step once.
    result = loop.finetune(
        model=model_dir, data=data, out=str(out), steps=5, save_every=4, resume=True, on_nonfinite="skip",
        **RUN, **QUIET,
    )  # fmt: skip
    assert result.skipped_steps == [3]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]
    assert all_finite_file(out / "adapter_model.safetensors")


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_stop_a_skipping_run(tiny, clean, tmp_path, monkeypatch):
    model_dir, data = tiny
    out = str(tmp_path / "streak")
    poison(monkeypatch, range(1, 100))  # every step after the first
    limit = nonfinite.MAX_CONSECUTIVE_NONFINITE
    with pytest.raises(nonfinite.NonFiniteLossError) as caught:
        loop.finetune(
            model=model_dir,
            data=data,
            out=out,
            steps=10,
            save_every=1,
            on_nonfinite="skip",
            **RUN,
            **QUIET,
        )
    e = caught.value
    assert e.step == 1 + limit and f"{limit} non-finite steps in a row" in str(e)
    # The newest checkpoint (of a skipped step) holds the state of step 1, the last good one.
    assert e.checkpoint == step_dir(out, limit)
    assert same_bits(arrays(e.checkpoint), arrays(step_dir(clean, 1)))
    assert not os.path.exists(os.path.join(out, "adapter_model.safetensors"))


def test_on_nonfinite_is_checked():
    with pytest.raises(ValueError, match="on_nonfinite must be 'stop' or 'skip'"):
        loop.finetune(model="unused", data="unused", out="unused", on_nonfinite="ignore")
    with pytest.raises(SystemExit):
        main(["finetune", "--on-nonfinite", "ignore"])


# --- a full disk --------------------------------------------------------------------------


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    # Random values (incompressible): one checkpoint fits the disk, a second does not.
    lora = {
        "a": jax.random.normal(jax.random.key(0), (20_000,)),
        "b": jnp.ones((2, 3), jnp.bfloat16),
    }
    tree = {"lora": lora, "opt": optax.adam(1e-3).init(lora), "rng": jax.random.key(3)}
    ckpt.save_checkpoint(str(tmp_path / "measure"), 2, tree, {"data_position": 2})
    one = disk_bytes(tmp_path / "measure")
    disk = tmp_path / "disk"
    with small_disk(disk, one * 3 // 2):
        first = ckpt.save_checkpoint(str(disk), 2, tree, {"data_position": 2})
        with pytest.raises(ckpt.DiskFullError) as caught:
            ckpt.save_checkpoint(str(disk), 4, jax.tree.map(lambda x: x, tree), {})
        message = str(caught.value)
        assert str(disk / "step_00000004") in message and "the disk is full" in message
        assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith(
            "step_00000004"
        )
        assert os.listdir(disk) == ["step_00000002"]  # nothing half-written is left
        assert ckpt.latest_checkpoint(str(disk)) == first
        restored, step, meta = ckpt.restore_checkpoint(first, tree)
    assert step == 2 and meta == {"data_position": 2}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.slow
def test_cli_reports_a_full_disk_and_the_run_resumes_after_it(
    tiny, clean, tmp_path, monkeypatch, capsys
):
    model_dir, data = tiny
    out = tmp_path / "full"
    poison(monkeypatch, [])
    # A disk with room for one checkpoint: step 2 is saved, the save of step 4 fails.
    one = disk_bytes(step_dir(clean, 2))
    with small_disk(out / "checkpoints", one * 3 // 2) as remount:
        _cli_full_disk_then_resume(model_dir, data, out, clean, capsys, remount, one)


def _cli_full_disk_then_resume(model_dir, data, out, clean, capsys, remount, one):
    assert main(cli_args(model_dir, data, out, 5, "--save-every", "2")) == 1
    err = capsys.readouterr().err
    failed, kept = step_dir(str(out), 4), step_dir(str(out), 2)
    assert f"jqlora finetune: error: cannot save checkpoint {failed}: the disk is full" in err
    assert f"add --resume to continue from {kept}" in err and "Traceback" not in err
    assert os.listdir(out / "checkpoints") == ["step_00000002"]
    assert not os.path.exists(out / "adapter_model.safetensors")
    assert same_bits(arrays(kept), arrays(step_dir(clean, 2)))

    # Space freed: --resume continues from step 2 and ends where the clean run ended.
    remount(one * 10)
    loop.finetune(
        model=model_dir, data=data, out=str(out), steps=5, save_every=2, resume=True, **RUN, **QUIET
    )
    with (
        open(out / "adapter_model.safetensors", "rb") as f,
        open(os.path.join(clean, "adapter_model.safetensors"), "rb") as g,
    ):
        assert f.read() == g.read()
    assert [(m["step"], m["loss"]) for m in metrics(out)] == [
        (m["step"], m["loss"]) for m in metrics(clean)
    ]
