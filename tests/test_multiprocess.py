"""Multi-process training on JAX's own distributed runtime (``jax.distributed`` over
localhost, CPU collectives over gloo): 2 processes x 2 devices (mesh fsdp=2,data=2: the
quantized base is split across the processes) and 4 processes x 1 device (data=4). Each process
loads only its rows of the batch; the result must equal the single-process run, and the
orbax checkpoint written by all processes must restore exactly, and a run resumed from
its training checkpoint (``jqlora.train.checkpoint``) must continue bit for bit as the
uninterrupted run.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time

import jax
import mesh_setup
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # several processes

HERE = os.path.dirname(__file__)
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The setup on disk, and its single-process, single-device training."""
    setup = mesh_setup.build()
    path = tmp_path_factory.mktemp("multiprocess") / "setup.pkl"
    mesh_setup.save(setup, path)
    losses, state, _ = mesh_setup.train(setup, steps=2 * mesh_setup.STEPS)
    _, first, _ = mesh_setup.train(setup)
    return path, losses, jax.tree.map(np.asarray, first.lora), jax.tree.map(np.asarray, state.lora)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(setup_path, workdir, n: int, devices: int, mesh: str) -> list[dict]:
    """Start ``n`` worker processes, wait for all (bounded), and stop every one of them
    whatever happens; returns each process's result."""
    port = _free_port()
    # Unoptimized XLA compiles faster; the comparison tolerance covers the difference.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    )
    procs, logs = [], []
    try:
        for i in range(n):
            log = open(workdir / f"log_{i}.txt", "w")
            logs.append(log)
            args = [
                sys.executable,
                os.path.join(HERE, "multiprocess_worker.py"),
                str(setup_path),
                str(workdir),
            ]
            args += [str(port), str(n), str(i), str(devices), mesh]
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{n} processes did not finish within {TIMEOUT_S} s:\n{_tails(workdir, n)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"processes {failed} failed:\n{_tails(workdir, n)}"
    results = []
    for i in range(n):
        with open(workdir / f"result_{i}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _tails(workdir, n: int) -> str:
    return "\n".join(
        f"--- process {i}:\n" + (workdir / f"log_{i}.txt").read_text()[-2000:] for i in range(n)
    )


@pytest.mark.parametrize("n, devices, mesh", [(2, 2, "fsdp=2,data=2"), (4, 1, "data=4")])
def test_multiprocess_training_equals_single_process(reference, tmp_path, n, devices, mesh):
    setup_path, ref_losses, ref_lora, ref_lora_twice = reference
    results = _run(setup_path, tmp_path, n, devices, mesh)
    rows = mesh_setup.BATCH // n
    for i, r in enumerate(results):
        assert r["rows"] == (i * rows, (i + 1) * rows)  # each process loaded only its rows
        np.testing.assert_allclose(r["losses"], ref_losses[: mesh_setup.STEPS], rtol=1e-5)
        assert mesh_setup.rel_diff(r["lora"], ref_lora) <= 1e-5
        assert r["restored_equal"] and r["restored_specs_equal"]
        # The training checkpoint: written by all processes, restored bit for bit onto the
        # same shardings, and the resumed run is the uninterrupted one, bit for bit.
        assert r["resumed_from"] == (
            str(tmp_path / "checkpoints" / f"step_{mesh_setup.STEPS:08d}"),
            mesh_setup.STEPS,
            {"rows": 1},
        )
        assert r["restored_ckpt_equal"] and r["resumed_specs_equal"]
        assert r["resumed_losses"] == r["whole_losses"][mesh_setup.STEPS :]
        assert r["resumed_equal"]
        # ...and both equal the single-process run of 2 * STEPS steps (tolerance as above).
        np.testing.assert_allclose(r["whole_losses"], ref_losses, rtol=1e-5)
        assert mesh_setup.rel_diff(r["resumed_lora"], ref_lora_twice) <= 1e-5
    assert results[-1]["losses"][-1] < results[-1]["losses"][0]
    if "fsdp" in mesh:  # each process holds half of the codes, one quarter per device
        assert all(r["state_spans_processes"] for r in results)  # np.asarray could not save it
        out, half_in = results[0]["codes_shape"]
        assert all(
            shape == (out // 2, half_in) for r in results for shape in r["codes_local_shapes"]
        )
