"""One process of a multi-process run of the tiny QLoRA setup on JAX's distributed runtime.

``python tests/multiprocess_worker.py SETUP.pkl WORKDIR PORT NUM_PROCESSES PROCESS_ID
DEVICES_PER_PROCESS MESH`` -- started ``NUM_PROCESSES`` times by ``test_multiprocess.py``.
Each process loads only its rows of the global batch, trains, saves the sharded train
state with orbax, restores it, and writes ``WORKDIR/result_{PROCESS_ID}.pkl``. It also
resumes: a training checkpoint (``jqlora.train.checkpoint``, written by all processes)
is restored into a fresh sharded state and trained on, beside an uninterrupted run.
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

    # Resume: the training checkpoint of step STEPS, restored into a freshly initialised
    # placed state, trained STEPS more steps; and the same 2 * STEPS steps uninterrupted.
    from jqlora.train import checkpoint as train_ckpt

    ckpt_dir = os.path.join(workdir, "checkpoints")
    saved = train_ckpt.save_checkpoint(ckpt_dir, mesh_setup.STEPS, {"state": state}, {"rows": 1})
    _, fresh, _ = mesh_setup.train(setup, mesh, steps=0, batch=local, whole_state=True)
    back, step, meta = train_ckpt.restore_checkpoint(
        train_ckpt.latest_checkpoint(ckpt_dir), {"state": fresh}
    )
    gather = lambda tree: jax.tree.map(
        np.asarray, multihost_utils.process_allgather(tree, tiled=True)
    )  # noqa: E731
    restored_ckpt_equal = all(
        a.tobytes() == b.tobytes()
        for a, b in zip(
            jax.tree.leaves(gather(state)), jax.tree.leaves(gather(back["state"])), strict=True
        )
    )
    # Each restored leaf is placed as the template (the fresh state) asks.
    resumed_specs_equal = [x.sharding for x in jax.tree.leaves(back["state"])] == [
        x.sharding for x in jax.tree.leaves(fresh)
    ]
    # To continue bit for bit as the uninterrupted run, the step must see the shardings
    # that training left (XLA chose some that differ from the fresh placement): a template
    # of shapes and shardings asks for them.
    like_trained = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    again, _, _ = train_ckpt.restore_checkpoint(saved, {"state": like_trained})
    resumed_losses, resumed, _ = mesh_setup.train(
        setup, mesh, batch=local, whole_state=True, start=again["state"]
    )
    whole_losses, whole, _ = mesh_setup.train(
        setup, mesh, steps=2 * mesh_setup.STEPS, batch=local, whole_state=True
    )

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
        "state_spans_processes": not all(x.is_fully_addressable for x in jax.tree.leaves(state)),
        "resumed_from": (saved, step, meta),
        "restored_ckpt_equal": restored_ckpt_equal,
        "resumed_specs_equal": resumed_specs_equal,
        "resumed_losses": resumed_losses,
        "whole_losses": whole_losses,
        "resumed_equal": all(
            a.tobytes() == b.tobytes()
            for a, b in zip(
                jax.tree.leaves(gather(resumed)), jax.tree.leaves(gather(whole)), strict=True
            )
        ),
        "resumed_lora": gather(resumed.lora),
        "codes_local_shapes": [s.data.shape for s in codes.addressable_shards],
        "codes_shape": codes.shape,
    }
    with open(os.path.join(workdir, f"result_{process_id}.pkl"), "wb") as f:
        pickle.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
