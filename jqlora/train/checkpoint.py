"""Checkpoints of a training run with orbax: any pytree of arrays plus a JSON dict of metadata.

Layout (orbax's ``CheckpointManager``, one format for one process and for many):
``DIR/step_00000040/{state/, meta/}``: ``state`` holds the arrays (orbax's standard
pytree format; every process writes its own shards of arrays sharded across processes),
``meta`` the JSON dict, the step and each leaf's path and shape.

Atomic: orbax writes a checkpoint into ``step_*.orbax-checkpoint-tmp`` and renames it
into place once it is complete, so a directory named ``step_*`` is always complete and a
run killed at any moment (during a save too) resumes from the newest one and loses
nothing before it. Saves are synchronous (``save_checkpoint`` returns once the
checkpoint is published). Keep-last-N is orbax's ``max_to_keep``; a checkpoint it prunes
is first renamed out of the ``step_*`` namespace (into ``DIR/.deleted/``) and then
removed, so a kill during the removal never leaves a half-deleted ``step_*``. A save
that fails removes what it wrote; a full disk raises ``DiskFullError`` naming the
checkpoint.

Restoring needs a *template* tree of the same structure (the freshly initialised
state); each restored leaf takes the template leaf's sharding, memory kind included, so
optimizer state kept in host memory comes back there. Restores are bit-exact for every
dtype (bfloat16, uint8 codes, typed PRNG keys).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Any

import jax
import numpy as np

_NAME = re.compile(r"^step_(\d{8})$")
_DELETED = ".deleted"  # pruned checkpoints are renamed here before they are removed
# "No space left on device" and "disk quota exceeded": the same fix for the user.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How tensorstore (orbax's array writer) reports the errno of a failed write.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")


class DiskFullError(OSError):
    """A write failed because the file system is full or over quota; ``filename`` is the
    path that could not be written, and the message says what to do."""

    def __init__(self, message: str, path: str):
        super().__init__(errno.ENOSPC, message, path)

    def __str__(self) -> str:
        return self.strerror or ""


def _manager(directory: str, keep: int = 0):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        step_name_format=ocp.step.standard_name_format(
            step_prefix="step", step_format_fixed_length=8
        ),
        enable_async_checkpointing=False,
        todelete_subdir=_DELETED,
        cleanup_tmp_directories=True,  # half-written saves of a run that was killed
        save_root_metadata=False,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=("state", "meta")
    )


def _leaf_infos(tree) -> list[dict]:
    def shape(leaf) -> list[int]:
        return list(jax.random.key_data(leaf).shape if _is_key(leaf) else np.shape(leaf))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [dict(path=jax.tree_util.keystr(p), shape=shape(x)) for p, x in leaves]


def save_checkpoint(directory: str, step: int, tree, meta: dict, keep: int = 2) -> str:
    """Write ``tree`` and ``meta`` as ``directory/step_{step:08d}``; keep the newest ``keep``
    (all with ``keep=0``). Every process calls it; it returns once the checkpoint is
    published. Saving an existing step again replaces it."""
    import orbax.checkpoint as ocp

    final = os.path.join(directory, f"step_{step:08d}")
    saved = {"step": step, "meta": meta, "leaves": _leaf_infos(tree)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(saved))
    with _manager(directory, keep) as manager:
        _remove_deleted(directory)  # left by a run killed while pruning
        if step in manager.all_steps():
            manager.delete(step)  # renamed away at once (not atomic with the save below)
        try:
            manager.save(step, args=args, force=True)
        except BaseException as e:
            # Nothing half-written stays behind (a full disk gets its space back at once).
            _remove_unfinished(directory)
            code = _errno_of(e)
            if code in DISK_FULL_ERRNOS:
                raise DiskFullError(
                    f"cannot save checkpoint {final}: the disk is full ({os.strerror(code)}); "
                    "nothing of it was kept and the earlier checkpoints are intact",
                    final,
                ) from e
            raise
    _remove_deleted(directory)
    return final


def _errno_of(e: BaseException) -> int | None:
    """The errno of a failed write: an ``OSError``'s, or the one tensorstore names."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        found = _TENSORSTORE_ERRNO.search(str(e))
        if found:
            return int(found[1])
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def _remove_unfinished(directory: str) -> None:
    if jax.process_index() == 0:
        for name in os.listdir(directory):
            if name.startswith("step_") and not _NAME.match(name):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _remove_deleted(directory: str) -> None:
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(directory, _DELETED), ignore_errors=True)


def all_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if _NAME.match(n))
    return [os.path.join(directory, n) for n in names]


def latest_checkpoint(directory: str) -> str | None:
    """The newest complete checkpoint, or None."""
    found = all_checkpoints(directory)
    return found[-1] if found else None


def _read_saved(path: str) -> dict:
    import orbax.checkpoint as ocp

    if os.path.exists(os.path.join(path, "meta.json")):
        raise ValueError(
            f"{path}: a checkpoint of an earlier jqlora (arrays.npz + meta.json), which this "
            "version does not read; start the run afresh in another output directory"
        )
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(os.path.join(os.path.abspath(path), "meta"))


def read_meta(path: str) -> dict:
    """The metadata dict saved with the checkpoint at ``path`` (no arrays are read)."""
    return _read_saved(path)["meta"]


def restore_checkpoint(path: str, template) -> tuple[Any, int, dict]:
    """``(tree, step, meta)`` from ``path``; ``template`` gives the structure and shardings:
    its leaves are arrays (e.g. the freshly initialised state) or ``jax.ShapeDtypeStruct``
    with a sharding (not for PRNG keys). Every process calls it.

    Raises ``ValueError`` naming the leaf when the checkpoint does not fit the template
    (a different model, LoRA rank or optimizer).
    """
    import orbax.checkpoint as ocp

    saved = _read_saved(path)
    infos, want = saved["leaves"], _leaf_infos(template)
    if len(infos) != len(want):
        raise ValueError(
            f"{path}: checkpoint has {len(infos)} arrays, this run's state has {len(want)} "
            "(different model, LoRA configuration or optimizer?)"
        )
    for info, mine in zip(infos, want, strict=True):
        if info != mine:
            raise ValueError(
                f"{path}: saved leaf {info['path']} {info['shape']} does not match this run's "
                f"{mine['path']} {mine['shape']}"
            )

    def abstract(leaf):
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        return leaf

    target = jax.tree.map(abstract, template)
    with _manager(os.path.dirname(os.path.abspath(path))) as manager:
        restored = manager.restore(
            saved["step"], args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    return restored.state, saved["step"], saved["meta"]


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
