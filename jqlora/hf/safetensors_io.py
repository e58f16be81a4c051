"""Reading and writing (sharded) safetensors checkpoints, one tensor at a time.

A checkpoint directory holds ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (``{"weight_map": {name: file}}``). Reading is the
``safetensors`` library's ``safe_open``; it yields ``(name, array)`` pairs so a caller can
convert each tensor before the next is read, and a file it refuses is explained in the
header's terms (which tensor, which field);
writing fills shards of at most ``max_shard_bytes`` and writes everything into a temporary
directory that replaces the target only when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{index}: not a JSON object ({e})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) for f in weight_map.values()
        ):
            raise ValueError(
                f'{index}: expected a "weight_map" object of tensor name -> shard file name'
            )
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
    """``{name: {"dtype": str, "shape": [int]}}`` of a safetensors file, as ``safe_open``
    reads it (it checks that the file holds every byte the header promises)."""
    with _open(path) as f:
        return {
            name: {"dtype": (info := f.get_slice(name)).get_dtype(), "shape": info.get_shape()}
            for name in f.keys()
        }


@contextlib.contextmanager
def _open(path: Path):
    """``safe_open(path)`` (numpy arrays; ``ml_dtypes`` gives bfloat16); its refusal of a
    file becomes a ValueError naming the file and, where the header shows it, the tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(_explain(Path(path), e)) from None
    with f:
        yield f


def _explain(path: Path, error: Exception) -> str:
    """Why ``safe_open`` refused ``path``, in the header's terms; the library's own words
    when the header shows nothing more specific."""
    size = path.stat().st_size
    if size < 8:
        return f"{path}: not a safetensors file (only {size} bytes)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            return (
                f"{path}: truncated or not a safetensors file: its first 8 bytes promise a "
                f"header of {n} bytes, the file has {size} in all"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        return f"{path}: corrupt safetensors header ({e})"
    if not isinstance(header, dict):
        return f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
    header.pop("__metadata__", None)
    for name, meta in header.items():
        problem = _entry_problem(meta)
        if problem:
            return f"{path}: corrupt safetensors header: tensor {name!r}: {problem}"
    past = [k for k, v in header.items() if 8 + n + v["data_offsets"][1] > size]
    if past:
        return (
            f"{path}: truncated: {len(past)} tensor(s) lie past the end of the file "
            f"({size} bytes), first {past[0]!r}"
        )
    return f"{path}: not a valid safetensors file ({error})"


def _entry_problem(meta) -> str | None:
    """What is wrong with one header entry, which must be ``{"dtype": str, "shape": [int >=
    0], "data_offsets": [start, end]}`` with ``end - start`` the byte size of that shape and
    dtype (when the dtype is a known one); None if nothing is."""
    if not isinstance(meta, dict):
        return f"expected an object, got {meta!r}"
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(dtype, str):
        return f"dtype {dtype!r} is not a string"
    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        return f"shape {shape!r} is not a list of integers >= 0"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        return f"data_offsets {offsets!r} is not [start, end] with 0 <= start <= end"
    if dtype in _ITEMSIZE:
        want = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != want:
            return f"{offsets[1] - offsets[0]} bytes for shape {shape} {dtype} ({want} needed)"
    return None


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}  # fmt: skip


def tensor_infos(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """``{name: (file, shape, safetensors dtype)}`` over all shards; a name in two shards is an error."""
    infos: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        for name, meta in read_header(path).items():
            if name in infos:
                raise ValueError(f"{path}: tensor {name!r} also appears in {infos[name][0].name}")
            infos[name] = (path, tuple(meta["shape"]), meta["dtype"])
    return infos


def iter_tensors(
    files: list[Path], names: list[str] | None = None
) -> Iterator[tuple[str, Path, np.ndarray]]:
    """``(name, file, numpy array)`` for every tensor (or those in ``names``), one at a time.

    The file is opened (memory-mapped by ``safe_open``) for one tensor at a time and closed
    once that tensor is copied out, so the checkpoint's pages never accumulate in the
    process's resident memory.
    """
    from safetensors import SafetensorError

    wanted = None if names is None else set(names)
    for path in files:
        for name in read_header(path):
            if wanted is not None and name not in wanted:
                continue
            with _open(path) as f:
                try:
                    array = np.array(f.get_tensor(name), copy=True)
                except (SafetensorError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}: tensor {name!r}: cannot read it ({e})") from None
            yield name, path, array


# ----------------------------------------------------------------------------- writing


def _nbytes(array) -> int:
    return int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize


class ShardWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes`` (a bigger
    tensor gets a shard of its own), holding only the current shard in memory.

    ``close()`` names the files as transformers does: ``model.safetensors`` when one shard
    suffices, else ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.current: dict = {}
        self.used = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, array) -> None:
        size = _nbytes(array)
        if self.current and self.used + size > self.max_shard_bytes:
            self._flush()
        self.current[name] = array
        self.used += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.flax import save_file

        path = self.directory / f".shard-{len(self.shards)}.safetensors"
        save_file(
            {n: jnp.asarray(a) for n, a in self.current.items()},
            str(path),
            metadata={"format": "pt"},
        )
        self.shards.append((path, list(self.current)))
        self.current, self.used = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the files, write the index; returns the file names."""
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        names = (
            [SINGLE_FILE]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        weight_map = {}
        for (path, tensors), file_name in zip(self.shards, names, strict=True):
            path.rename(self.directory / file_name)
            weight_map.update({t: file_name for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return names


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
