"""The serialized form bitsandbytes and transformers use for a 4-bit weight.

A 4-bit linear layer's ``weight`` is saved as these entries of the state dict (safetensors)::

    weight                                uint8 [ceil(n / 2), 1]   packed codes, high nibble first
    weight.absmax                         float32 [n_blocks], or uint8 codes with double quant
    weight.quant_map                      float32 [16]             the NF4 / FP4 code book
    weight.nested_absmax                  float32 [ceil(n_blocks / 256)]   (double quant only)
    weight.nested_quant_map               float32 [256]            the signed dynamic map (idem)
    weight.quant_state.bitsandbytes__nf4  uint8: UTF-8 JSON {"quant_type", "blocksize", "dtype",
                                          "shape"[, "nested_blocksize", "nested_dtype",
                                          "nested_offset"]}                      (or __fp4)

`to_bnb` writes exactly these; `from_bnb` reads them back into a `QuantizedTensor`, checking
that the JSON and the arrays agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.quant.codebooks import (
    BLOCKSIZES,
    DYNAMIC_SIGNED,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    codebook,
)
from jqlora.quant.tensor import QuantizedTensor, check_layout, codes_shape

_DTYPE_NAMES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _state_key(prefix: str, quant_type: str) -> str:
    return f"{prefix}.quant_state.bitsandbytes__{quant_type}"


def to_bnb(qt: QuantizedTensor, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The state-dict entries transformers + bitsandbytes write for ``qt`` under ``prefix``."""
    check_layout(qt, prefix)
    n = qt.size
    out: dict[str, np.ndarray] = {prefix: np.asarray(qt.codes, np.uint8).reshape((n + 1) // 2, 1)}
    out[f"{prefix}.absmax"] = np.asarray(qt.absmax).reshape(-1)
    out[f"{prefix}.quant_map"] = codebook(qt.quant_type).copy()
    meta = {
        "quant_type": qt.quant_type,
        "blocksize": int(qt.blocksize),
        "dtype": np.dtype(qt.dtype).name,
        "shape": [int(d) for d in qt.shape],
    }
    if qt.double_quant:
        out[f"{prefix}.nested_absmax"] = np.asarray(qt.nested_absmax, np.float32).reshape(-1)
        out[f"{prefix}.nested_quant_map"] = DYNAMIC_SIGNED.copy()
        meta.update(
            nested_blocksize=NESTED_BLOCKSIZE,
            nested_dtype="float32",
            nested_offset=float(np.float32(np.asarray(qt.offset))),
        )
    out[_state_key(prefix, qt.quant_type)] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), np.uint8
    ).copy()
    return out


def _read_meta(state_dict, prefix: str) -> tuple[str, dict]:
    keys = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(keys) != 1:
        raise ValueError(
            f"{prefix}: expected exactly one '{prefix}.quant_state.bitsandbytes__nf4' or '__fp4' entry, "
            f"found {sorted(keys) or 'none'}"
        )
    key = keys[0]
    quant_type = key.rsplit("__", 1)[1]
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{prefix}: unknown quant type in key {key!r}")
    try:
        meta = json.loads(np.asarray(state_dict[key], np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{prefix}: {key} does not hold UTF-8 JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{prefix}: {key} holds JSON {type(meta).__name__}, not an object")
    if meta.get("quant_type") != quant_type:
        raise ValueError(
            f"{prefix}: {key} says quant_type {meta.get('quant_type')!r}, its key says {quant_type!r}"
        )
    for field in ("blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{prefix}: {key} lacks {field!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{prefix}: {key}: shape must be a list of integers >= 0, got {shape!r}")
    for field in ("blocksize", "nested_blocksize"):
        if field in meta and not _is_int(meta[field]):
            raise ValueError(f"{prefix}: {key}: {field} must be an integer, got {meta[field]!r}")
    if not isinstance(meta["dtype"], str):
        raise ValueError(f"{prefix}: {key}: dtype must be a string, got {meta['dtype']!r}")
    offset = meta.get("nested_offset", 0.0)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise ValueError(f"{prefix}: {key}: nested_offset must be a number, got {offset!r}")
    return quant_type, meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _array(state_dict, key: str, prefix: str) -> np.ndarray:
    if key not in state_dict:
        raise ValueError(f"{prefix}: missing state-dict entry {key!r}")
    value = state_dict[key]
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _expect(cond: bool, prefix: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{prefix}: {what}")


def from_bnb(state_dict, prefix: str = "weight") -> QuantizedTensor:
    """The `QuantizedTensor` stored under ``prefix`` in a bitsandbytes / transformers state dict.

    Raises ValueError naming ``prefix`` when an entry is missing or the JSON quant state
    disagrees with the arrays (shape, block count, dtype, double quantization).
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{prefix}: expected a state dict (a mapping of names to arrays), got {type(state_dict).__name__}"
        )
    quant_type, meta = _read_meta(state_dict, prefix)
    shape = tuple(int(d) for d in meta["shape"])
    blocksize = int(meta["blocksize"])
    _expect(
        blocksize in BLOCKSIZES,
        prefix,
        f"blocksize {blocksize} is not one bitsandbytes allows {BLOCKSIZES}",
    )
    _expect(meta["dtype"] in _DTYPE_NAMES, prefix, f"unsupported dtype {meta['dtype']!r}")
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)

    codes = _array(state_dict, prefix, prefix)
    if codes.dtype != np.uint8:  # a quant_storage other than uint8 holds the same bytes
        codes = np.ascontiguousarray(codes).view(np.uint8)
    _expect(
        codes.size == (n + 1) // 2,
        prefix,
        f"{codes.size} code bytes, but shape {list(shape)} needs {(n + 1) // 2}",
    )
    absmax = _array(state_dict, f"{prefix}.absmax", prefix).reshape(-1)
    _expect(
        absmax.size == n_blocks,
        prefix,
        f"absmax has {absmax.size} entries, shape and blocksize need {n_blocks}",
    )
    quant_map = _array(state_dict, f"{prefix}.quant_map", prefix)
    _expect(
        np.array_equal(quant_map.astype(np.float32).reshape(-1), codebook(quant_type)),
        prefix,
        f"quant_map is not the {quant_type} code book",
    )

    nested: jax.Array | None = None
    offset: jax.Array | None = None
    if "nested_offset" in meta or f"{prefix}.nested_absmax" in state_dict:
        _expect(
            "nested_offset" in meta,
            prefix,
            "nested_absmax is present but the quant state has no nested_offset",
        )
        nested_np = (
            _array(state_dict, f"{prefix}.nested_absmax", prefix).reshape(-1).astype(np.float32)
        )
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        _expect(
            nested_np.size == n_nested,
            prefix,
            f"nested_absmax has {nested_np.size} entries, {n_nested} expected",
        )
        _expect(
            int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)) == NESTED_BLOCKSIZE,
            prefix,
            f"nested_blocksize {meta.get('nested_blocksize')} (only {NESTED_BLOCKSIZE} is supported)",
        )
        nested_map = _array(state_dict, f"{prefix}.nested_quant_map", prefix)
        _expect(
            np.array_equal(nested_map.astype(np.float32).reshape(-1), DYNAMIC_SIGNED),
            prefix,
            "nested_quant_map is not the signed dynamic map",
        )
        _expect(
            absmax.dtype == np.uint8,
            prefix,
            f"double-quantized absmax must be uint8, got {absmax.dtype}",
        )
        offset = jnp.asarray(np.float32(meta["nested_offset"]))
        nested = jnp.asarray(nested_np)
    else:
        _expect(absmax.dtype == np.float32, prefix, f"absmax must be float32, got {absmax.dtype}")

    return QuantizedTensor(
        codes=jnp.asarray(codes.reshape(codes_shape(shape))),
        absmax=jnp.asarray(absmax),
        nested_absmax=nested,
        offset=offset,
        shape=shape,
        dtype=jnp.dtype(_DTYPE_NAMES[meta["dtype"]]),
        quant_type=quant_type,
        blocksize=blocksize,
    )
