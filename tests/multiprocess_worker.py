"""One process of a multi-process run of the tiny QLoRA setup on JAX's distributed runtime.

``python tests/multiprocess_worker.py SETUP.pkl WORKDIR PORT NUM_PROCESSES PROCESS_ID
DEVICES_PER_PROCESS MESH`` -- started ``NUM_PROCESSES`` times by ``test_multiprocess.py``.
Each process loads only its rows of the global batch, trains, saves the sharded train
state with orbax, restores it, and writes ``WORKDIR/result_{PROCESS_ID}.pkl``.
"""

from __future__ import annotations

import os
import pickle
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))


def main(setup_path, workdir, port, num_processes, process_id, devices_per_process, mesh_text):
    from jqlora.distributed import initialize

    jax.config.update("jax_num_cpu_devices", int(devices_per_process))
    initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))

    import mesh_setup
    import numpy as np
    from jax.experimental import multihost_utils

    from jqlora.distributed import restore_sharded, save_sharded
    from jqlora.sharding import make_mesh, process_rows

    setup = mesh_setup.load(setup_path)
    mesh = make_mesh(mesh_text)
    rows = process_rows(mesh_setup.BATCH, mesh)
    local = {k: v[rows] for k, v in setup["batch"].items()}
    losses, state, params = mesh_setup.train(setup, mesh, batch=local, whole_state=True)

    ckpt = os.path.join(workdir, "ckpt")
    save_sharded(ckpt, state)
    restored = restore_sharded(ckpt, state)

    gather = lambda tree: jax.tree.map(
        np.asarray, multihost_utils.process_allgather(tree, tiled=True)
    )  # noqa: E731
    codes = params["model"]["layers"]["0"]["mlp"]["down_proj"]["weight"].codes
    result = {
        "losses": losses,
        "rows": (rows.start, rows.stop),
        "lora": gather(state.lora),
        "restored_equal": all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(gather(state)), jax.tree.leaves(gather(restored)), strict=True
            )
        ),
        "restored_specs_equal": [x.sharding for x in jax.tree.leaves(restored)]
        == [x.sharding for x in jax.tree.leaves(state)],
        "codes_local_shapes": [s.data.shape for s in codes.addressable_shards],
        "codes_shape": codes.shape,
    }
    with open(os.path.join(workdir, f"result_{process_id}.pkl"), "wb") as f:
        pickle.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
