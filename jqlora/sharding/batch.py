"""Batches on a mesh: split over the ``data`` and ``fsdp`` axes, each process loading only
its own rows."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jqlora.sharding.mesh import BATCH_AXES, _group, _size, _spec
from jqlora.sharding.rules import _path_str


def _batch_group(mesh: Mesh) -> tuple[str, ...]:
    # In mesh order, so that the rows follow the device order and each process (whose
    # devices are consecutive in it) holds one contiguous block of rows.
    return _group(mesh, tuple(a for a in mesh.axis_names if a in BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many parts the batch is split into on ``mesh`` (product of its batch axes)."""
    return _size(mesh, _batch_group(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dimension 0 split over the mesh's batch axes (``data`` and ``fsdp``)."""
    return NamedSharding(mesh, _spec([_batch_group(mesh)]))


def process_rows(global_rows: int, mesh: Mesh) -> slice:
    """The rows of a global batch that this process loads and passes to ``shard_batch``.

    With one process, all of them. The mesh's device order must give each process one
    contiguous block of rows (``make_mesh`` over ``jax.devices()`` does).
    """
    sharding = batch_sharding(mesh)
    index = sharding.devices_indices_map((global_rows,))
    rows = [index[device][0] for device in sharding.addressable_devices]
    bounds = sorted({(r.start or 0, global_rows if r.stop is None else r.stop) for r in rows})
    covered = sum(hi - lo for lo, hi in bounds)
    lo, hi = bounds[0][0], bounds[-1][1]
    if covered != hi - lo:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds non-contiguous batch rows {bounds}"
        )
    return slice(lo, hi)


def shard_batch(batch, mesh: Mesh):
    """A global batch from this process's rows: ``batch`` holds the
    ``1/process_count`` of the global batch that this process loaded (all of it in a
    single-process run); the rows are split over the mesh's batch axes."""
    sharding = batch_sharding(mesh)
    n = batch_shards(mesh)

    def one(path, x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        if rows % n:
            raise ValueError(
                f"batch[{_path_str(path)}]: global batch size {rows} does not divide over the {n} batch shards "
                f"of mesh {dict(mesh.shape)}"
            )
        return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(one, batch)
