"""What a training checkpoint holds on disk, read with orbax alone (no template), for tests
that compare checkpoints or check that each one is whole; and a small real disk to fill."""

from __future__ import annotations

import contextlib
import os
import subprocess

import jax
import numpy as np
import pytest


def checkpoint_arrays(path) -> dict[str, np.ndarray]:
    """A checkpoint's leaves by tree path, as host arrays (PRNG keys as their key data)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(os.path.join(os.path.abspath(path), "state"))

    def host(x):
        is_key = isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        return np.asarray(jax.random.key_data(x) if is_key else x)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): host(x) for k, x in leaves}


def disk_bytes(path) -> int:
    """Bytes the files under ``path`` take on a tmpfs (whole 4 KiB pages)."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(-(-os.path.getsize(os.path.join(root, f)) // 4096) * 4096 for f in files)
    return total


@contextlib.contextmanager
def small_disk(path, size_bytes: int):
    """A real file system of ``size_bytes`` mounted at ``path`` (a tmpfs; needs root, else
    the test is skipped): writes past its size fail with ENOSPC as on a full disk.
    ``remount(size)`` grows it (space freed)."""
    os.makedirs(path, exist_ok=True)

    def mount(*options):
        return subprocess.run(
            ["mount", "-t", "tmpfs", *options, "tmpfs", str(path)], capture_output=True
        )

    if mount("-o", f"size={size_bytes}").returncode:
        pytest.skip("needs permission to mount a small tmpfs (root)")
    try:
        yield lambda size: subprocess.run(
            ["mount", "-o", f"remount,size={size}", str(path)], check=True
        )
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
