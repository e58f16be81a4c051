"""Sharded QLoRA: placement rules (in this process) and training on 8 host devices
(``sharded_worker.py`` in a subprocess, since the device count is fixed at jax start-up).

The reference for the sharded runs is the same training on one device: equal losses and
adapters (float32, <= 1e-5 relative) show the partitioned program computes the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import mesh_setup
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jqlora.quant import quantize
from jqlora.sharding import (
    BATCH_SPLIT,
    MODEL_SPLIT,
    like_tree,
    lora_shardings,
    make_mesh,
    mesh_arg,
    param_shardings,
    parse_mesh,
    per_device,
    plan,
)

HERE = os.path.dirname(__file__)


# ----------------------------------------------------------------------------- rules (1 device)


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert parse_mesh(" tensor=2 , data=-1 ") == {"tensor": 2, "data": -1}
    for bad, words in [
        ("data=2,data=2", "twice"),
        ("batch=2", "names"),
        ("data", "name=size"),
        ("data=x", "not an integer"),
        ("data=0", ">= 1"),
        ("data=-1,fsdp=-1", "at most one"),
        ("", "no axes"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_mesh(bad)


def test_mesh_arg_reports_the_reason():
    parser = argparse.ArgumentParser(prog="jqlora finetune", exit_on_error=False)
    parser.add_argument("--mesh", type=mesh_arg)
    assert parser.parse_args(["--mesh", "data=2,fsdp=4"]).mesh == {"data": 2, "fsdp": 4}
    with pytest.raises(argparse.ArgumentError, match="given twice"):
        parser.parse_args(["--mesh", "data=2,data=4"])


def test_make_mesh_checks_device_count():
    assert dict(make_mesh().shape) == {"data": jax.device_count()}
    assert dict(make_mesh("fsdp=-1").shape) == {"fsdp": jax.device_count()}
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh({"data": 4})


def _weights(**shapes):
    """``{"model": {name: {"weight": quantized [out, in]}}}``."""
    rng = np.random.default_rng(0)
    return {
        "model": {
            n: {
                "weight": quantize(
                    jnp.asarray(rng.normal(size=s), jnp.float32), "nf4", 64, double_quant=True
                )
            }
            for n, s in shapes.items()
        }
    }


def test_quantized_split_on_whole_blocks_else_fallback_else_error():
    mesh = AbstractMesh((4, 2), ("fsdp", "tensor"))
    params = _weights(o_proj=(64, 256), down_proj=(256, 64), q_proj=(8, 128))
    placed = plan(params, mesh)
    # row-parallel: out over fsdp, in over tensor (256 % (64*2) == 0)
    assert placed["model/o_proj/weight"] == [("fsdp",), ("tensor",)]
    # in = 64 cannot take 2 whole blocks: tensor moves to out
    assert placed["model/down_proj/weight"] == [("fsdp", "tensor"), ()]
    shardings = param_shardings(params, mesh)
    o = shardings["model"]["o_proj"]["weight"]
    assert o.codes.spec == P("fsdp", "tensor")
    assert o.absmax.spec == P("fsdp")  # flat absmax follows the rows only
    assert o.nested_absmax.spec == P()  # 256 blocks / 4 shards: not whole nested blocks
    # q_proj [8, 128] over 8 devices: one row (2 blocks) per device along out is legal
    assert placed["model/q_proj/weight"] == [("tensor", "fsdp"), ()]
    with pytest.raises(ValueError, match=r"model/gate_proj/weight.*\(6, 128\)"):
        plan(_weights(gate_proj=(6, 128)), mesh)


def test_adapters_and_optimizer_state_follow_the_base():
    mesh = AbstractMesh((4, 2), ("fsdp", "tensor"))
    params = _weights(o_proj=(64, 256))
    lora = {"model": {"o_proj": {"a": jnp.zeros((4, 256)), "b": jnp.zeros((64, 4))}}}
    ls = lora_shardings(lora, params, mesh)
    assert ls["model"]["o_proj"]["a"].spec == P(None, "tensor")
    assert ls["model"]["o_proj"]["b"].spec == P("fsdp")
    opt_state = optax.adamw(1e-3).init(lora)
    specs = jax.tree.leaves(
        like_tree(opt_state, lora, ls, mesh), is_leaf=lambda s: hasattr(s, "spec")
    )
    # count (replicated), mu (a, b), nu (a, b)
    assert [s.spec for s in specs] == [
        P(),
        P(None, "tensor"),
        P("fsdp"),
        P(None, "tensor"),
        P("fsdp"),
    ]


def test_per_device_memory_divides_the_estimate():
    from jqlora.memory import estimate_memory

    config = dict(mesh_setup.CONFIG, num_hidden_layers=2)
    one = estimate_memory(config, batch_size=8, seq_len=64, offload=True, backend="xla")
    mesh = per_device(one, "data=2,fsdp=2,tensor=2")
    for c1, cn in zip(one.columns, mesh.columns, strict=True):
        for k, v in c1.device.items():
            want = v / 4 if k in MODEL_SPLIT else v / 4 if k in BATCH_SPLIT else v
            assert cn.device[k] == pytest.approx(want, abs=1), (c1.name, k)
        assert cn.host == {k: -(-v // 4) for k, v in c1.host.items()}
    assert (
        mesh.qlora.device["dequantize scratch (XLA)"]
        == one.qlora.device["dequantize scratch (XLA)"]
    )
    assert (
        per_device(one, {"tensor": 2}).qlora.device["activations"]
        == one.qlora.device["activations"]
    )
    with pytest.raises(ValueError, match="no -1"):
        per_device(one, "data=-1")


# ----------------------------------------------------------------------------- 8 host devices


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "setup.pkl"
    mesh_setup.save(mesh_setup.build(), path)
    # Unoptimized XLA compiles about a third faster; the comparison runs under the same flags.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_worker.py"), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the `sharded` fixture: a subprocess with 8 devices
@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2", "fsdp=8 offload"])
def test_sharded_training_equals_one_device(sharded, mesh):
    run = sharded["meshes"][mesh]
    # with jqlora.offload the sharded optimizer state stays in host memory between steps
    assert run["opt_memory_kinds"] == (["pinned_host"] if "offload" in mesh else ["device"])
    assert run["loss_rel"] <= 1e-5, (run["losses"], sharded["ref_losses"])
    assert run["lora_rel"] <= 1e-5
    # the loss moved, so the comparison is about training, not a constant
    assert run["losses"][-1] < run["losses"][0]
    assert run["opt_follows_lora"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh, shards", [("fsdp=8", 8), ("data=2,fsdp=4", 4), ("fsdp=4,tensor=2", 8)]
)
def test_quantized_base_is_really_sharded(sharded, mesh, shards):
    layout = sharded["meshes"][mesh]["layout"]
    assert len(layout) == 7  # q, k, v, o, gate, up, down
    for name, w in layout.items():
        assert w["devices"] == 8, name
        assert w["distinct"] == shards, (name, w)
        assert np.prod(w["shard"]) * shards == np.prod(w["codes"]), (name, w)
    if mesh == "fsdp=4,tensor=2":
        # row-parallel: codes split along in over tensor, absmax only along out
        o = layout["model.layers.0.self_attn.o_proj.weight"]
        assert o["shard"] == [128 // 4, 64 // 2] and o["absmax_shard"] == [o["absmax"][0] // 4]
    else:
        assert all(w["absmax_shard"][0] * shards == w["absmax"][0] for w in layout.values())


@pytest.mark.slow
def test_model_under_shard_map_equals_one_device(sharded):
    assert sharded["shard_map"]["loss_rel"] <= 1e-6
    assert sharded["shard_map"]["grad_rel"] <= 1e-5


@pytest.mark.slow
def test_load_hf_places_each_tensor_on_its_shards(sharded):
    assert sharded["load"]["equal"]  # same bytes as a plain load
    layout = sharded["load"]["layout"]
    assert len(layout) == 7
    for name, w in layout.items():
        assert w["distinct"] == 8 and np.prod(w["shard"]) * 8 == np.prod(w["codes"]), (name, w)
