"""Blockwise 4-bit quantization and dequantization, bit-exact with bitsandbytes (CPU).

Math, for a block ``x`` of ``blocksize`` consecutive flat elements::

    absmax = max |x|
    code_i = argmin_c |book[c] - x_i / absmax|      (ties: the lower of the two values)
    x_i   ~= book[code_i] * absmax

With double quantization ``absmax`` is stored as 8-bit codes of ``absmax - mean(absmax)``
over the signed dynamic map, in blocks of 256, each with an f32 ``nested_absmax``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.quant.codebooks import BLOCKSIZES, DYNAMIC_SIGNED, NESTED_BLOCKSIZE, QUANT_TYPES, codebook
from jqlora.quant.tensor import QuantizedTensor, codes_shape

_FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def _check_args(w, quant_type: str, blocksize: int, name: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: blocksize {blocksize} is not one bitsandbytes allows {BLOCKSIZES}")
    if jnp.dtype(w.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise ValueError(
            f"{name}: cannot quantize dtype {jnp.dtype(w.dtype).name}; expected float32, float16 or bfloat16"
        )
    if math.prod(w.shape) == 0:
        raise ValueError(f"{name}: cannot quantize an empty array of shape {tuple(w.shape)}")


def _bucketize(scaled: jax.Array, book: np.ndarray) -> jax.Array:
    """Index into ``book`` of the value nearest to each element; a tie takes the lower value.

    The comparison is against float32 midpoints of the sorted book, as bitsandbytes does.
    """
    order = np.argsort(book, kind="stable")
    sorted_book = book[order]
    # FP4 holds 0.0 twice (codes 0 and 8); bitsandbytes maps zero to code 0.
    keep = np.concatenate([[True], np.diff(sorted_book) > 0])
    sorted_book, order = sorted_book[keep], order[keep]
    mids = ((sorted_book[:-1] + sorted_book[1:]) / np.float32(2)).astype(np.float32)
    idx = jnp.searchsorted(jnp.asarray(mids), scaled, side="left", method="compare_all")
    return jnp.asarray(order.astype(np.uint8))[idx]


def _blocks(flat: jax.Array, blocksize: int) -> jax.Array:
    n = flat.shape[0]
    n_blocks = -(-n // blocksize)
    return jnp.pad(flat, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)


def _scale(blocks: jax.Array, absmax: jax.Array, n: int, blocksize: int) -> jax.Array:
    """``x / absmax`` the way bitsandbytes' CPU kernel rounds it.

    Full blocks multiply by the reciprocal; a partial last block divides.
    """
    recip = blocks * (1.0 / absmax)[:, None]
    if n % blocksize == 0:
        return recip
    divided = blocks / absmax[:, None]
    is_tail = (jnp.arange(blocks.shape[0]) == blocks.shape[0] - 1)[:, None]
    return jnp.where(is_tail, divided, recip)


def _pack(codes: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if codes.shape[0] % 2:
        codes = jnp.pad(codes, (0, 1))
    pairs = codes.reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    return packed.astype(jnp.uint8).reshape(codes_shape(shape))


def unpack(codes: jax.Array, n: int) -> jax.Array:
    """The ``n`` 4-bit codes (uint8 values 0..15) held in the packed bytes ``codes``."""
    flat = codes.reshape(-1)
    both = jnp.stack([flat >> 4, flat & 0xF], axis=-1).reshape(-1)
    return both[:n]


def quantize_blockwise_8bit(x: jax.Array, blocksize: int = NESTED_BLOCKSIZE):
    """8-bit blockwise quantization over the signed dynamic map: ``(codes, absmax)``."""
    n = x.shape[0]
    blocks = _blocks(x, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = _scale(blocks, absmax, n, blocksize)
    codes = _bucketize(scaled, DYNAMIC_SIGNED).reshape(-1)[:n]
    return codes, absmax


def decode_absmax(qt: QuantizedTensor) -> jax.Array:
    """The float32 absmax of every block, decoding double quantization if present.

    ``DYN[q] * nested_absmax`` and ``+ offset`` are two separately rounded float32 operations
    in bitsandbytes; the optimization barrier keeps XLA from fusing them into one FMA, which
    would move thousands of values by one ulp.
    """
    if not qt.double_quant:
        return qt.absmax
    nested = jnp.repeat(qt.nested_absmax, NESTED_BLOCKSIZE)[: qt.n_blocks]
    scaled = jnp.asarray(DYNAMIC_SIGNED)[qt.absmax.astype(jnp.int32)] * nested
    scaled = jax.lax.optimization_barrier(scaled)
    return scaled + qt.offset


def quantize(
    w: jax.Array,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    name: str = "tensor",
) -> QuantizedTensor:
    """Quantize ``w`` (float32/float16/bfloat16, any shape) to 4 bits, as bitsandbytes does.

    ``name`` only labels error messages.
    """
    _check_args(w, quant_type, blocksize, name)
    shape = tuple(int(d) for d in w.shape)
    n = math.prod(shape)
    flat = jnp.asarray(w).reshape(-1).astype(jnp.float32)
    blocks = _blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    codes = _bucketize(_scale(blocks, absmax, n, blocksize), codebook(quant_type)).reshape(-1)[:n]
    packed = _pack(codes, shape)
    nested = offset = None
    if double_quant:
        offset = jnp.mean(absmax)
        absmax, nested = quantize_blockwise_8bit(absmax - offset)
    return QuantizedTensor(
        codes=packed,
        absmax=absmax,
        nested_absmax=nested,
        offset=offset,
        shape=shape,
        dtype=jnp.dtype(w.dtype),
        quant_type=quant_type,
        blocksize=blocksize,
    )


def dequantize(qt: QuantizedTensor, dtype=None) -> jax.Array:
    """The array ``qt`` stands for, in ``dtype`` (default: the original dtype).

    ``w_i = book[code_i] * absmax[i // blocksize]`` in float32, then cast.
    """
    dtype = qt.dtype if dtype is None else dtype
    n = qt.size
    values = jnp.asarray(codebook(qt.quant_type))[unpack(qt.codes, n).astype(jnp.int32)]
    absmax = jnp.repeat(decode_absmax(qt), qt.blocksize)[:n]
    return (values * absmax).reshape(qt.shape).astype(dtype)
