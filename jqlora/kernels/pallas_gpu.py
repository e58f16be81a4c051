"""The GPU back end of `qmatmul`: Pallas kernels on the Triton back end, routed by M.

`qmatmul` picks, per product and direction, a row of the GPU's table (`gpu_tiles`):

* ``"gemv"`` (small M, `gpu_gemv`): the packed weight read once, products on CUDA cores;
* ``"dequant"`` (training-sized M): the kernel below writes the weight in the compute
  dtype and XLA's ``dot`` (cuBLAS) multiplies it; the backward ``dx = dy @ W`` contracts
  W's first axis, so no ``W.T`` is made. The XLA back end's row chunks (`xla.matmul`) keep
  only one chunk of the dequantized weight live.

Dequantize kernel: the codes viewed as ``[n_blocks, blocksize / 2]`` bytes, ``R`` blocks a
program (``R * blocksize`` = the table's ``elements``)::

    p        = codes[b0 : b0 + R]                      uint8, element 2j in the high nibble
    v        = interleave(book[p >> 4], book[p & 15])  gather-loads from the 16-entry book
    out[b]   = v[b] * absmax[b]                        absmax decoded once per block

Per weight element: half a widening, shift and mask (they act on bytes), one gather-load,
one multiply, one cast; ``tests/test_kernels_gpu.py`` counts them in the traced kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jqlora.kernels import gpu_gemv, gpu_tiles, xla
from jqlora.kernels.lookup import (
    block_scales,
    book_operand,
    out_struct,
    scale_operands,
    vary_alike,
)
from jqlora.quant import QuantizedTensor


def _dequantize_kernel(codes_ref, book_ref, *refs, n_blocks: int, rows: int, blocksize: int):
    *scale_refs, out_ref = refs
    b0 = pl.program_id(0) * rows
    blocks = b0 + jnp.arange(rows)
    live = blocks < n_blocks
    packed = plgpu.load(
        codes_ref.at[pl.ds(b0, rows), :],
        mask=jnp.broadcast_to(live[:, None], (rows, blocksize // 2)),
        other=0,
    ).astype(jnp.int32)
    values = jnp.stack([book_ref[packed >> 4], book_ref[packed & 0xF]], axis=-1)
    scale = block_scales(scale_refs, jnp.minimum(blocks, n_blocks - 1))
    out = values.reshape(rows, blocksize) * scale[:, None]
    plgpu.store(
        out_ref.at[pl.ds(b0, rows), :],
        out.astype(out_ref.dtype),
        mask=jnp.broadcast_to(live[:, None], (rows, blocksize)),
    )


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def dequantize(
    w: QuantizedTensor, dtype, *, tiles: gpu_tiles.DequantTiles, interpret: bool = False
) -> jax.Array:
    """``dequantize(w)`` as ``[N, K]`` in ``dtype``, by the Pallas kernel.

    ``w``: 2-D codes ``[N, K / 2]`` and blocks within rows (`qmatmul.kernel_supports`).
    """
    n, k = int(w.codes.shape[0]), 2 * int(w.codes.shape[1])
    bs = w.blocksize
    n_blocks = n * k // bs
    rows = min(_pow2_floor(tiles.elements // bs), _pow2_floor(n_blocks))
    codes = w.codes.reshape(n_blocks, bs // 2)
    operands = vary_alike(codes, book_operand(w.quant_type), *scale_operands(w))
    body = functools.partial(_dequantize_kernel, n_blocks=n_blocks, rows=rows, blocksize=bs)
    out = pl.pallas_call(
        body,
        out_shape=out_struct((n_blocks, bs), dtype, *operands),
        grid=(pl.cdiv(n_blocks, rows),),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
        interpret=interpret,
        name=f"dequantize_{w.quant_type}",
    )(*operands)
    return out.reshape(n, k)


def _dequant_fn(tiles, interpret: bool):
    return lambda wc, dtype: dequantize(wc, dtype, tiles=tiles, interpret=interpret)


def matmul(
    x: jax.Array,
    w: QuantizedTensor,
    dtype,
    route: gpu_tiles.Route,
    *,
    interpret: bool = False,
) -> jax.Array:
    """``x @ dequantize(w).T`` for ``x [M, K]``: ``[M, N]`` in ``dtype`` (float32 accumulate).

    ``route``: the kernel and its tiles (`qmatmul` picks it from `gpu_tiles` by M).
    """
    w = xla.local_weight(w)
    if isinstance(route.tiles, gpu_tiles.GemvTiles):
        return gpu_gemv.matmul(x, w, dtype, tiles=route.tiles, interpret=interpret)
    return xla.matmul(x, w, dtype, dequant=_dequant_fn(route.tiles, interpret))


def matmul_t(
    dy: jax.Array,
    w: QuantizedTensor,
    dtype,
    route: gpu_tiles.Route,
    *,
    interpret: bool = False,
) -> jax.Array:
    """``dy @ dequantize(w)`` for ``dy [M, N]``: ``[M, K]`` in ``dtype`` (float32 accumulate)."""
    w = xla.local_weight(w)
    if isinstance(route.tiles, gpu_tiles.GemvTiles):
        return gpu_gemv.matmul_t(dy, w, dtype, tiles=route.tiles, interpret=interpret)
    return xla.matmul_t(dy, w, dtype, dequant=_dequant_fn(route.tiles, interpret))
