"""Blockwise 4-bit quantization and dequantization, bit-exact with bitsandbytes (CPU).

Math, for a block ``x`` of ``blocksize`` consecutive flat elements::

    absmax = max |x|
    code_i = order[#{bounds < x_i * (1 / absmax)}]   (a partial last block: x_i / absmax)
    x_i   ~= book[code_i] * absmax

``bounds`` are the float32 midpoints of the sorted code book, so a value exactly on a
midpoint takes the lower code. With double quantization ``absmax`` is stored as 8-bit codes
of ``absmax - offset`` (``offset = mean(absmax)``, summed as torch sums) over the signed dynamic map, in blocks of
256, each with an f32 ``nested_absmax``.

Special values follow bitsandbytes' CPU code: an all-zero full block stores absmax 0.0 and
the code of 0.0; an all-zero last partial block stores absmax 1e-38; a NaN makes its
block's absmax NaN and every code of the block the code of the largest value (15 for NF4,
3 for FP4); an inf makes its block's absmax inf, the other values of the block the code of
0.0 and itself the code of NaN. One deliberate difference: XLA flushes float32 subnormals
(|v| < 1.18e-38) to zero, so a value whose ratio to its block's absmax is that small is
quantized as 0.0 (which only changes a code for FP4, whose zero has two codes).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.quant.codebooks import (
    BLOCKSIZES,
    DYNAMIC_LUT,
    DYNAMIC_LUT_SIZE,
    DYNAMIC_SIGNED,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    bucket_bounds,
    codebook,
)
from jqlora.quant.tensor import QuantizedTensor, check_layout, codes_shape
from jqlora.quant.torch_mean import torch_mean

FLOAT_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.float16), np.dtype(jnp.bfloat16))

#: bitsandbytes clamps a block's absmax to at least 1e-38 (a float32 subnormal) before it
#: scales; XLA flushes subnormals, so the clamp is done with selects on these constants.
_TINY = np.float32(1e-38)
_RECIP_TINY = np.float32(1.0) / _TINY
_FLT_MIN = np.finfo(np.float32).tiny


def check_quantize_args(w, quant_type: str, blocksize: int, name: str = "tensor") -> None:
    """Raise a ValueError naming ``name`` if bitsandbytes could not quantize ``w`` so."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"{name}: unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}"
        )
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise ValueError(
            f"{name}: blocksize must be an integer, one of {BLOCKSIZES}; got {blocksize!r}"
        )
    if blocksize not in BLOCKSIZES:
        raise ValueError(
            f"{name}: blocksize {blocksize!r} is not one bitsandbytes allows {BLOCKSIZES}"
        )
    dtype = getattr(w, "dtype", None)
    if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES:
        got = "no dtype" if dtype is None else f"dtype {np.dtype(dtype).name}"
        raise ValueError(
            f"{name}: cannot quantize an array of {got}; expected float32, float16 or bfloat16"
        )
    if math.prod(w.shape) == 0:
        raise ValueError(f"{name}: cannot quantize an empty array of shape {tuple(w.shape)}")


def bucketize(x: jax.Array, quant_type: str) -> jax.Array:
    """The 4-bit code (int32) of every element of ``x``, already scaled to [-1, 1].

    ``order[#{bounds < x}]``, found by a 4-step binary search over the 15 sorted bounds.
    Each step's bound is chosen from constants by the earlier steps' outcomes (selects, no
    gather), so XLA fuses the search into one vectorized loop. ``not (x <= b)`` counts NaN
    above every bound, as ``torch.bucketize`` does.
    """
    bounds, order = bucket_bounds(quant_type)
    above: list[
        jax.Array
    ] = []  # above[k]: x is in the upper half at step k (bit 3 - k of the bucket index)
    for step in (8, 4, 2, 1):
        candidates = [np.float32(bounds[base + step - 1]) for base in range(0, 16, 2 * step)]
        above.append(~(x <= _choose(above, candidates)))
    if np.array_equal(order, np.arange(16)):
        return jnp.asarray(sum(jnp.where(bit, 1 << (3 - k), 0) for k, bit in enumerate(above)))
    return _choose(above, [np.int32(o) for o in order])


def _choose(bits: list, values: list):
    """``values[index]`` where the booleans ``bits`` are the index's binary digits, MSB first."""
    if len(values) == 1:
        return values[0]
    half = len(values) // 2
    return jnp.where(bits[0], _choose(bits[1:], values[half:]), _choose(bits[1:], values[:half]))


def _pack_scaled(scaled: jax.Array, quant_type: str) -> jax.Array:
    """Bytes of the codes of ``scaled`` (even length): even-index element in the high nibble.

    Both nibbles are computed from strided views of ``scaled``, so XLA fuses scaling,
    bucketing and packing into one loop that writes only the bytes.
    """
    pairs = scaled.reshape(-1, 2)
    hi, lo = bucketize(pairs[:, 0], quant_type), bucketize(pairs[:, 1], quant_type)
    return ((hi << 4) | lo).astype(jnp.uint8)


def _quantize_4bit(flat: jax.Array, quant_type: str, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """``(packed uint8 [ceil(n / 2)], absmax f32 [n_blocks])`` of a flat float32 array."""
    n = flat.shape[0]
    full = n - n % blocksize
    packed, absmax = [], []
    if full:
        blocks = flat[:full].reshape(-1, blocksize)
        am = jnp.max(jnp.abs(blocks), axis=1)
        recip = jnp.where(am < _FLT_MIN, _RECIP_TINY, 1.0 / am)
        packed.append(_pack_scaled(blocks * recip[:, None], quant_type))
        absmax.append(am)
    if full < n:
        # bitsandbytes divides in the partial last block (full blocks multiply by 1/absmax),
        # stores its clamped absmax, and pads an odd count with a scaled 0.0.
        tail = flat[full:]
        am = jnp.max(jnp.abs(tail))
        tiny = am < _FLT_MIN
        scaled = jnp.where(tiny, tail * _RECIP_TINY, tail / am)
        packed.append(_pack_scaled(jnp.pad(scaled, (0, (n - full) % 2)), quant_type))
        absmax.append(jnp.where(tiny, _TINY, am)[None])
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
    return cat(packed), cat(absmax)


def unpack(codes: jax.Array, n: int) -> jax.Array:
    """The ``n`` 4-bit codes (uint8 values 0..15) held in the packed bytes ``codes``."""
    flat = codes.reshape(-1)
    both = jnp.stack([flat >> 4, flat & 0xF], axis=-1).reshape(-1)
    return both[:n]


def quantize_8bit(x: jax.Array, blocksize: int = NESTED_BLOCKSIZE) -> tuple[jax.Array, jax.Array]:
    """8-bit blockwise quantization over the signed dynamic map: ``(codes uint8, absmax f32)``.

    As bitsandbytes' CPU kernel: ``absmax = max |x|`` ignoring NaN; an all-zero block gets
    code 0; otherwise ``code = LUT[int((clamp(x / absmax, -1, 1) + 1) / 2 * 65535 + 0.5)]``
    with ``x / absmax`` taken as ``x * (1 / absmax)`` in every block, and NaN at index 0.
    """
    n = x.shape[0]
    n_blocks = -(-n // blocksize)
    blocks = jnp.pad(x, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    mag = jnp.abs(blocks)
    absmax = jnp.max(jnp.where(jnp.isnan(mag), 0.0, mag), axis=1)
    scaled = jnp.clip(blocks * (1.0 / absmax)[:, None], -1.0, 1.0)
    grid = ((scaled + 1.0) * 0.5) * np.float32(DYNAMIC_LUT_SIZE - 1) + 0.5
    idx = jnp.where(jnp.isnan(grid), 0, grid).astype(jnp.int32)
    codes = jnp.where((absmax == 0)[:, None], 0, jnp.asarray(DYNAMIC_LUT)[idx])
    return codes.astype(jnp.uint8).reshape(-1)[:n], absmax


def double_quantize(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(absmax codes uint8, nested_absmax f32)``: `quantize_8bit` of ``absmax - offset``."""
    return quantize_8bit(absmax - offset.astype(jnp.float32))


def decode_absmax(qt: QuantizedTensor) -> jax.Array:
    """The float32 absmax of every block, decoding double quantization if present.

    ``DYN[q] * nested_absmax`` and ``+ offset`` are two separately rounded float32 operations
    in bitsandbytes; fused into one FMA (as XLA does under jit) thousands of values move by
    one ulp.
    """
    nested_absmax, offset = qt.nested_absmax, qt.offset
    if nested_absmax is None:  # not double-quantized
        return qt.absmax
    if offset is None:
        raise ValueError("a double-quantized tensor needs its offset")
    q = qt.absmax.reshape(-1).astype(jnp.int32)
    n_blocks = q.shape[0]
    n_nested = nested_absmax.shape[-1]
    q = jnp.pad(q, (0, n_nested * NESTED_BLOCKSIZE - n_blocks)).reshape(n_nested, NESTED_BLOCKSIZE)
    scaled = (jnp.asarray(DYNAMIC_SIGNED)[q] * nested_absmax.reshape(-1, 1)).reshape(-1)
    # XLA drops optimization barriers and contracts the multiply-add into one FMA. A select
    # on the product's bits keeps the multiply from feeding the add directly, so the product
    # is rounded first. Its condition is false only when the offset is one particular NaN,
    # and then the sum is NaN whichever arm is taken; no compiler can prove that.
    bits = jax.lax.bitcast_convert_type(scaled, jnp.int32)
    offset_bits = jax.lax.bitcast_convert_type(jnp.asarray(offset, jnp.float32), jnp.int32)
    bits = jnp.where(offset_bits != jnp.int32(0x7FBADBAD), bits, bits ^ 1)
    scaled = jax.lax.bitcast_convert_type(bits, jnp.float32)[:n_blocks]
    return scaled + offset


@functools.partial(
    jax.jit, static_argnames=("quant_type", "blocksize", "double_quant", "offset_threads")
)
def _quantize(
    w: jax.Array, quant_type: str, blocksize: int, double_quant: bool, offset_threads: int
):
    flat = w.reshape(-1).astype(jnp.float32)
    packed, absmax = _quantize_4bit(flat, quant_type, blocksize)
    packed = packed.reshape(codes_shape(w.shape))
    if not double_quant:
        return packed, absmax, None, None
    offset = torch_mean(absmax, offset_threads)
    qabsmax, nested = double_quantize(absmax, offset)
    return packed, qabsmax, nested, offset


def quantize(
    w: jax.Array,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    offset_threads: int = 1,
    name: str = "tensor",
) -> QuantizedTensor:
    """Quantize ``w`` (float32/float16/bfloat16, any shape) to 4 bits, as bitsandbytes does.

    Equals ``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=
    double_quant, quant_type=quant_type)`` on the CPU byte for byte, the double-quant offset
    ``mean(absmax)`` included: it is summed in the order of torch's CPU kernel (see
    `jqlora.quant.torch_mean`). That order depends on torch's thread count once there are
    at least 32768 blocks (2M weights at blocksize 64); ``offset_threads`` is that count
    (``torch.get_num_threads()`` of the run to reproduce). Another count, or a
    bitsandbytes run on a GPU, gives an offset a few float32 ulps away. Jit-able; ``name``
    only labels error messages.
    """
    check_quantize_args(w, quant_type, blocksize, name)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ValueError(f"{name}: double_quant must be True or False, got {double_quant!r}")
    if not (isinstance(offset_threads, int) and offset_threads >= 1):
        raise ValueError(f"{name}: offset_threads must be a positive int, got {offset_threads!r}")
    packed, absmax, nested, offset = _quantize(
        jnp.asarray(w), quant_type, int(blocksize), bool(double_quant), offset_threads
    )
    return QuantizedTensor(
        codes=packed,
        absmax=absmax,
        nested_absmax=nested,
        offset=offset,
        shape=tuple(int(d) for d in w.shape),
        dtype=jnp.dtype(w.dtype),
        quant_type=quant_type,
        blocksize=int(blocksize),
    )


def dequantize(qt: QuantizedTensor, dtype=None) -> jax.Array:
    """The array ``qt`` stands for, in ``dtype`` (default: the original dtype).

    ``w_i = book[code_i] * absmax[i // blocksize]`` in float32, then rounded to ``dtype``
    (to nearest even), as bitsandbytes' ``dequantize_4bit``.
    """
    check_layout(qt, "dequantize")
    return _dequantize(qt, jnp.dtype(qt.dtype if dtype is None else dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(qt: QuantizedTensor, dtype) -> jax.Array:
    n = qt.size
    absmax = decode_absmax(qt).reshape(-1)
    n_blocks = absmax.shape[0]
    values = jnp.asarray(codebook(qt.quant_type))[unpack(qt.codes, n).astype(jnp.int32)]
    values = jnp.pad(values, (0, n_blocks * qt.blocksize - n)).reshape(n_blocks, qt.blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n].reshape(qt.shape).astype(dtype)
