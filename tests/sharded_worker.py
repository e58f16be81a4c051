"""Runs the tiny QLoRA setup on 8 host CPU devices; prints one JSON line of measurements.

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_worker.py SETUP.pkl``
(started by ``test_sharding.py``: the device count is fixed when jax starts, so it needs
its own process). The single-device reference runs here too, committed to device 0.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
import mesh_setup  # noqa: E402

from jqlora.quant import QuantizedTensor  # noqa: E402
from jqlora.sharding import make_mesh  # noqa: E402

MESHES = {  # name: (mesh axes, optimizer state offloaded to host memory)
    "fsdp=8": ({"fsdp": 8}, False),
    "data=2,fsdp=4": ({"data": 2, "fsdp": 4}, False),
    "fsdp=4,tensor=2": ({"fsdp": 4, "tensor": 2}, False),
    "fsdp=8 offload": ({"fsdp": 8}, True),
}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _codes_layout(params) -> dict:
    """Per quantized weight: global codes shape, one shard's shape, distinct shards, and
    whether every device's absmax shard is that of its rows."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda v: isinstance(v, QuantizedTensor)
    )[0]:
        if not isinstance(x, QuantizedTensor):
            continue
        name = ".".join(str(k.key) for k in path)
        shards = x.codes.addressable_shards
        distinct = {tuple((s.start, s.stop) for s in sh.index) for sh in shards}
        out[name] = {
            "codes": list(x.codes.shape),
            "shard": list(shards[0].data.shape),
            "distinct": len(distinct),
            "devices": len(shards),
            "absmax_shard": list(x.absmax.addressable_shards[0].data.shape),
            "absmax": list(x.absmax.shape),
            "spec": str(x.codes.sharding.spec),
        }
    return out


def _opt_follows_lora(state) -> bool:
    """Adam's mu and nu carry exactly the adapters' shardings."""
    lora_specs = [x.sharding.spec for x in jax.tree.leaves(state.lora)]
    adam = [
        s
        for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
        if hasattr(s, "mu")
    ]
    return bool(adam) and all(
        [x.sharding.spec for x in jax.tree.leaves(getattr(s, f))] == lora_specs
        for s in adam
        for f in ("mu", "nu")
    )


def shard_map_grads(setup):
    """Loss and adapter gradients with the model inside ``shard_map`` (batch split over 8
    devices, each device running the full forward with qmatmul on its rows), combined
    with token-weighted ``psum``s; and the same on one device."""
    from jqlora.train.step import loss_fn, target_mask

    m = mesh_setup.model()
    grad = jax.value_and_grad(loss_fn, has_aux=True)
    dev0 = jax.devices()[0]
    lora, params, batch = (jax.device_put(setup[k], dev0) for k in ("lora", "params", "batch"))
    (ref_loss, _), ref_grads = jax.jit(lambda lo, p, b: grad(lo, p, b, model=m))(
        lora, params, batch
    )

    def local(lora, params, batch):
        # Each device's loss is weighted by its share of the target tokens. ``lora`` is
        # replicated (unvarying over "data"), so shard_map's autodiff already sums its
        # cotangent over the axis: the gradient below is the global one.
        tokens = jnp.sum(target_mask(batch))
        share = tokens / jax.lax.psum(tokens, "data")
        loss, g = jax.value_and_grad(lambda lo: loss_fn(lo, params, batch, model=m)[0] * share)(
            lora
        )
        return jax.lax.psum(loss, "data"), g

    mesh = make_mesh({"data": 8})
    f = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P()))
    )
    loss, grads = f(setup["lora"], setup["params"], setup["batch"])  # host arrays: jit places them
    return {"loss_rel": _rel(loss, ref_loss), "grad_rel": mesh_setup.rel_diff(grads, ref_grads)}


def load_onto_shards(workdir: str) -> dict:
    """``load_hf(..., place=placer(mesh))`` on a float checkpoint: each weight arrives split
    8 ways, with the same bytes as a plain load."""
    from safetensors.numpy import save_file

    from jqlora import QuantConfig, load_hf
    from jqlora.hf.names import flatten
    from jqlora.sharding import placer

    m = mesh_setup.model()
    params = jax.jit(m.init)(jax.random.PRNGKey(3), jnp.zeros((1, 2), jnp.int32))["params"]
    save_file(
        {k: np.asarray(v) for k, v in flatten(params).items()},
        os.path.join(workdir, "model.safetensors"),
    )
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(mesh_setup.CONFIG, f)
    quant = QuantConfig(quant_type="nf4", double_quant=True)
    _, plain = load_hf(workdir, quant)
    _, placed = load_hf(workdir, quant, place=placer(make_mesh({"fsdp": 8})))
    equal = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(placed), strict=True)
    )
    return {"equal": equal, "layout": _codes_layout(placed)}


def main(setup_path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    setup = mesh_setup.load(setup_path)
    clock = time.process_time()
    with jax.default_device(jax.devices()[0]):
        ref_losses, ref_state, _ = mesh_setup.train(setup)
    result = {
        "ref_losses": ref_losses,
        "meshes": {},
        "cpu_s": {"one device": time.process_time() - clock},
    }
    for name, (axes, offload) in MESHES.items():
        clock = time.process_time()
        losses, state, params = mesh_setup.train(setup, make_mesh(axes), offload=offload)
        result["cpu_s"][name] = time.process_time() - clock
        result["meshes"][name] = {
            "losses": losses,
            "loss_rel": _rel(losses, ref_losses),
            "lora_rel": mesh_setup.rel_diff(state.lora, ref_state.lora),
            "layout": _codes_layout(params),
            "opt_follows_lora": _opt_follows_lora(state),
            "opt_memory_kinds": sorted(
                {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
            ),
            "lora_b_spec": str(
                state.lora["model"]["layers"]["0"]["self_attn"]["q_proj"]["b"].sharding.spec
            ),
        }
    clock = time.process_time()
    result["shard_map"] = shard_map_grads(setup)
    result["cpu_s"]["shard_map"] = time.process_time() - clock
    result["load"] = load_onto_shards(os.path.dirname(setup_path))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
