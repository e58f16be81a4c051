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
    """The JSON header of a safetensors file (``{name: {dtype, shape, data_offsets}}``), after
    checking that the file holds every byte the header promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(
                f"{path}: truncated or not a safetensors file: its first 8 bytes promise a "
                f"header of {n} bytes, the file has {size} in all"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
        )
    header.pop("__metadata__", None)
    for name, meta in header.items():
        _check_entry(path, name, meta)
    missing = [k for k, v in header.items() if 8 + n + v["data_offsets"][1] > size]
    if missing:
        raise ValueError(
            f"{path}: truncated: {len(missing)} tensor(s) lie past the end of the file ({size} bytes), "
            f"first {missing[0]!r}"
        )
    return header


def _check_entry(path: Path, name: str, meta) -> None:
    """One header entry is ``{"dtype": str, "shape": [int >= 0], "data_offsets": [start, end]}``
    with ``end - start`` the byte size of that shape and dtype (when jqlora knows the dtype)."""

    def bad(why: str):
        return ValueError(f"{path}: corrupt safetensors header: tensor {name!r}: {why}")

    if not isinstance(meta, dict):
        raise bad(f"expected an object, got {meta!r}")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(dtype, str):
        raise bad(f"dtype {dtype!r} is not a string")
    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of integers >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} is not [start, end] with 0 <= start <= end")
    if dtype in _DTYPES:
        want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != want:
            raise bad(f"{offsets[1] - offsets[0]} bytes for shape {shape} {dtype} ({want} needed)")


def tensor_infos(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """``{name: (file, shape, safetensors dtype)}`` over all shards; a name in two shards is an error."""
    infos: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        for name, meta in read_header(path).items():
            if name in infos:
                raise ValueError(f"{path}: tensor {name!r} also appears in {infos[name][0].name}")
            infos[name] = (path, tuple(meta["shape"]), meta["dtype"])
    return infos


_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def iter_tensors(
    files: list[Path], names: list[str] | None = None
) -> Iterator[tuple[str, Path, np.ndarray]]:
    """``(name, file, numpy array)`` for every tensor (or those in ``names``), one at a time.

    Each tensor is read with a plain ``read`` into memory that is freed once the caller drops
    it; nothing is memory-mapped, so the checkpoint's pages never count against the process.
    """
    wanted = None if names is None else set(names)
    for path in files:
        header = read_header(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            data_start = 8 + n
            for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if wanted is not None and name not in wanted:
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise ValueError(
                        f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}"
                    )
                dtype = np.dtype(_DTYPES[meta["dtype"]])
                start, end = meta["data_offsets"]
                shape = tuple(meta["shape"])
                if end - start != int(np.prod(shape)) * dtype.itemsize:
                    raise ValueError(
                        f"{path}: tensor {name!r}: {end - start} bytes for shape {shape} {meta['dtype']}"
                    )
                f.seek(data_start + start)
                array = np.frombuffer(bytearray(f.read(end - start)), dtype=dtype).reshape(shape)
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
