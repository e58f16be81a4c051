"""Atomic checkpoints of a training run: any pytree of arrays plus a JSON dict of metadata.

Layout: ``DIR/step_00000040/{arrays.npz, meta.json}``. A checkpoint is written into a
temporary directory beside it, flushed to disk, and renamed into place in one
``os.rename``: a directory named ``step_*`` is always complete, so a run killed at any
moment (during a save too) resumes from the newest one and loses nothing before it.
A save that fails (a full disk raises ``DiskFullError``, naming the checkpoint) removes
what it wrote, and pruning renames an old checkpoint away before deleting it.

Arrays are stored as their raw bytes with dtype and shape recorded, so a restore is
bit-exact for every dtype (bfloat16, uint8 codes, PRNG key data). Restoring needs a
*template* tree of the same structure (the freshly initialised state); each restored leaf
takes the template leaf's sharding, so state kept in host memory stays there.

Why not orbax: the trees here are small (LoRA + optimizer state), restore must be
bit-exact and keep memory kinds, and a single atomic rename of a plain directory is the
whole guarantee we need, on every jax version the project supports.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np

_NAME = re.compile(r"^step_(\d{8})$")
# "No space left on device" and "disk quota exceeded": the same fix for the user.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the file system is full or over quota; ``filename`` is the
    path that could not be written, and the message says what to do."""

    def __init__(self, message: str, path: str):
        super().__init__(errno.ENOSPC, message, path)

    def __str__(self) -> str:
        return self.strerror or ""


def _to_numpy(leaf) -> tuple[np.ndarray, dict]:
    """Raw bytes of a leaf and how to rebuild it."""
    info: dict[str, Any] = {}
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        info["prng_impl"] = str(jax.random.key_impl(leaf))
        leaf = jax.random.key_data(leaf)
    arr = np.asarray(leaf)
    info.update(dtype=arr.dtype.name, shape=list(arr.shape))
    return np.ascontiguousarray(arr.reshape(-1)).view(np.uint8), info


def _from_numpy(raw: np.ndarray, info: dict, template):
    import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy)

    dtype = np.dtype(info["dtype"])
    arr = raw.view(dtype).reshape(info["shape"])
    if "prng_impl" in info:
        out = jax.random.wrap_key_data(arr, impl=info["prng_impl"])
        return jax.device_put(out, template.sharding) if isinstance(template, jax.Array) else out
    if isinstance(template, jax.Array):
        return jax.device_put(arr, template.sharding)
    return arr


def save_checkpoint(directory: str, step: int, tree, meta: dict, keep: int = 2) -> str:
    """Write ``tree`` and ``meta`` as ``directory/step_{step:08d}``; keep the newest ``keep``."""
    os.makedirs(directory, exist_ok=True)
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays, infos = {}, []
    for i, (path, leaf) in enumerate(leaves_with_paths):
        raw, info = _to_numpy(leaf)
        arrays[f"leaf_{i:05d}"] = raw
        infos.append(dict(info, path=jax.tree_util.keystr(path)))
    final = os.path.join(directory, f"step_{step:08d}")
    tmp = os.path.join(directory, f".tmp-step_{step:08d}-{os.getpid()}")
    for leftover in os.listdir(directory):  # half-written saves of a run that was killed
        if leftover.startswith(".tmp-step_") or ".old-" in leftover:
            shutil.rmtree(os.path.join(directory, leftover), ignore_errors=True)
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "arrays.npz"), "wb") as f:
            # numpy's stub types **kwds against allow_pickle too; the keys are leaf_NNNNN.
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "meta": meta, "leaves": infos}, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        # Nothing half-written stays behind (a full disk gets its space back at once).
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(
                f"cannot save checkpoint {final}: the disk is full ({e.strerror}); "
                "nothing of it was kept and the earlier checkpoints are intact",
                final,
            ) from e
        raise
    if os.path.exists(final):  # the same step saved again (e.g. after a resume): swap it out
        old = final + f".old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(directory)
    for stale in all_checkpoints(directory)[:-keep] if keep > 0 else []:
        # Renamed out of the step_* namespace first, so a kill during the removal never
        # leaves a half-deleted directory that looks like a checkpoint.
        doomed = stale + f".old-{os.getpid()}"
        os.rename(stale, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def read_meta(path: str) -> dict:
    """The metadata dict saved with the checkpoint at ``path`` (no arrays are read)."""
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)["meta"]


def restore_checkpoint(path: str, template) -> tuple[Any, int, dict]:
    """``(tree, step, meta)`` from ``path``; ``template`` gives the structure and shardings.

    Raises ``ValueError`` naming the leaf when the checkpoint does not fit the template
    (a different model, LoRA rank or optimizer).
    """
    with open(os.path.join(path, "meta.json")) as f:
        saved = json.load(f)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    infos = saved["leaves"]
    if len(infos) != len(leaves_with_paths):
        raise ValueError(
            f"{path}: checkpoint has {len(infos)} arrays, this run's state has {len(leaves_with_paths)} "
            "(different model, LoRA configuration or optimizer?)"
        )
    leaves = []
    with np.load(os.path.join(path, "arrays.npz")) as npz:
        for i, ((kpath, tleaf), info) in enumerate(zip(leaves_with_paths, infos, strict=True)):
            name = jax.tree_util.keystr(kpath)
            tshape = list(np.shape(jax.random.key_data(tleaf) if _is_key(tleaf) else tleaf))
            if info["path"] != name or info["shape"] != tshape:
                raise ValueError(
                    f"{path}: saved leaf {info['path']} {info['shape']} does not match this run's {name} {tshape}"
                )
            leaves.append(_from_numpy(npz[f"leaf_{i:05d}"], info, tleaf))
    return jax.tree_util.tree_unflatten(treedef, leaves), saved["step"], saved["meta"]


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
