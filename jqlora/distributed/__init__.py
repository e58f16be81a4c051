"""Running one training over several processes with JAX's own multi-controller runtime.

Every process runs the same program: ``initialize()`` first, then the same model, the
same ``jqlora.sharding`` placement on a mesh over all processes' devices, and its own
rows of each batch (``jqlora.sharding.process_rows`` / ``shard_batch``). Checkpoints of
sharded state are written and read by all processes together (orbax).
"""

from __future__ import annotations

import os

import jax

__all__ = ["initialize", "restore_sharded", "save_sharded"]


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
):
    """``jax.distributed.initialize`` with CPU collectives over gloo (used only by CPU
    devices; GPUs use NCCL, TPUs their interconnect). Call it first, before any other jax
    call, in every process. On a TPU slice, or under SLURM / Open MPI, the arguments
    are discovered and may be omitted.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def save_sharded(path: str, tree) -> None:
    """Write ``tree`` (sharded arrays, possibly spread over processes) with orbax; every
    process calls it and writes its own shards."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(path), tree)
        ckpt.wait_until_finished()


def restore_sharded(path: str, like):
    """The tree saved at ``path``, each array placed with the sharding of the matching leaf
    of ``like`` (arrays or ``jax.ShapeDtypeStruct`` with shardings); every process calls it."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like
    )
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(os.path.abspath(path), abstract)
