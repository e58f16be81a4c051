"""Helpers that run live bitsandbytes (CPU) on the same input jqlora gets."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bnb_quantize(w: np.ndarray, dtype: str, quant_type: str, blocksize: int, double_quant: bool):
    """``(packed, quant_state)`` from ``bitsandbytes.functional.quantize_4bit``."""
    t = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(TORCH_DTYPES[dtype])
    return bnbf.quantize_4bit(
        t, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )


def bnb_absmax(state) -> np.ndarray:
    """The float32 absmax bitsandbytes' dequantize uses (double quantization decoded)."""
    if not state.nested:
        return state.absmax.numpy()
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.numpy()


def avx512_dequantize_bug(shape, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU dequantize_4bit takes its AVX512 path with a wrong absmax.

    It indexes absmax per row (``row * (cols // blocksize) + col // blocksize``), which is
    wrong when rows do not hold whole blocks: last dim a multiple of 16 but not of the
    blocksize, more than one row, blocksize below 2048 (those fall back to the generic code).
    """
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    cols = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows > 1 and cols % 16 == 0 and cols % blocksize != 0 and blocksize < 2048


def bnb_dequantize(packed, state, quant_type: str) -> np.ndarray:
    """bitsandbytes' dequantization as float32, or, where its AVX512 path misreads absmax
    (see `avx512_dequantize_bug`), the formula it implements everywhere else:
    ``book[code] * absmax[i // blocksize]`` in float32, rounded to the original dtype."""
    shape = tuple(state.shape)
    if not avx512_dequantize_bug(shape, state.blocksize):
        # Odd last dimensions and blocksizes >= 2048 take bitsandbytes' torch.compile'd
        # fallback, which compiles for every new shape (seconds each); eager runs the
        # same float32 multiply and rounding.
        with torch.compiler.set_stance("force_eager"):
            return (
                bnbf.dequantize_4bit(packed, state).float().numpy().reshape(shape)
            )  # 1-D comes back [n, 1]
    n = int(np.prod(shape))
    codes = packed.numpy().reshape(-1)
    codes = np.stack([codes >> 4, codes & 15], -1).reshape(-1)[:n]
    book = bnbf.get_4bit_type(quant_type, device="cpu").numpy().astype(np.float32)
    absmax = np.repeat(bnb_absmax(state), state.blocksize)[:n]
    values = torch.from_numpy((book[codes] * absmax).astype(np.float32))
    return values.to(state.dtype).float().numpy().reshape(shape)
