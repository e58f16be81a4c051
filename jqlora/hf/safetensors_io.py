"""Reading and writing (sharded) safetensors checkpoints, one tensor at a time.

A checkpoint directory holds ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (``{"weight_map": {name: file}}``). Reading yields
``(name, array)`` pairs so a caller can convert each tensor before the next is read;
writing fills shards of at most ``max_shard_bytes`` and writes everything into a temporary
directory that replaces the target only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in dict.fromkeys(sorted(set(weight_map.values())))]
    elif (directory / SINGLE_FILE).exists():
        files = [directory / SINGLE_FILE]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")
    for f in files:
        if not f.exists():
            raise ValueError(f"{index}: lists shard {f.name}, which does not exist")
    return files


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (``{name: {dtype, shape, data_offsets}}``), after
    checking that the file holds every byte the header promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"{path}: truncated: the header needs {8 + n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    missing = [k for k, v in header.items() if 8 + n + v["data_offsets"][1] > size]
    if missing:
        raise ValueError(
            f"{path}: truncated: {len(missing)} tensor(s) lie past the end of the file ({size} bytes), "
            f"first {missing[0]!r}"
        )
    return header


def tensor_infos(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """``{name: (file, shape, safetensors dtype)}`` over all shards; a name in two shards is an error."""
    infos = {}
    for path in files:
        for name, meta in read_header(path).items():
            if name in infos:
                raise ValueError(f"{path}: tensor {name!r} also appears in {infos[name][0].name}")
            infos[name] = (path, tuple(meta["shape"]), meta["dtype"])
    return infos


def iter_tensors(files: list[Path], names: list[str] | None = None) -> Iterator[tuple[str, Path, object]]:
    """``(name, file, jax array)`` for every tensor (or those in ``names``), one at a time."""
    from safetensors import SafetensorError, safe_open

    wanted = None if names is None else set(names)
    for path in files:
        try:
            with safe_open(str(path), framework="flax") as f:
                for name in f.keys():
                    if wanted is None or name in wanted:
                        yield name, path, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{path}: cannot read safetensors file: {e}") from None


# ----------------------------------------------------------------------------- writing


def _nbytes(array) -> int:
    return int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize


def plan_shards(sizes: dict[str, int], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def write_checkpoint(tmp_dir: Path, tensors: dict, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write ``{name: numpy array}`` as safetensors into ``tmp_dir``; returns the file names.

    One file ``model.safetensors`` when it fits, else ``model-0000i-of-0000n.safetensors`` and
    the index. Arrays may be produced lazily: values that are callables are called when their
    shard is written, so only one shard's tensors need be in memory.
    """
    from safetensors.numpy import save_file

    sizes = {name: _size_of(t) for name, t in tensors.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        arrays = {n: np.ascontiguousarray(_materialize(tensors[n])) for n in shard}
        save_file(arrays, str(tmp_dir / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in shard})
        del arrays
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


def _size_of(t) -> int:
    if callable(t):
        t = t.size_hint
    return t if isinstance(t, int) else _nbytes(t)


def _materialize(t):
    return t() if callable(t) else t


class Lazy:
    """A tensor computed when written: ``Lazy(fn, nbytes)``."""

    def __init__(self, fn, nbytes: int):
        self.fn, self.size_hint = fn, nbytes

    def __call__(self):
        return self.fn()


@contextlib.contextmanager
def atomic_directory(out_dir: Path):
    """Yield a temporary directory beside ``out_dir`` that replaces it on success only."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
