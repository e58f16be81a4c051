"""Fused 4-bit dequantize-matmul for TPUs: a Pallas kernel on the Mosaic TPU back end.

TPU vector units have no fast gather, and slicing or interleaving along lanes is costly, so
the kernel works on the weight tile *transposed* (K in sublanes, N in lanes) and on the two
nibbles separately. With ``x_e = x[:, 0::2]``, ``x_o = x[:, 1::2]`` (split once per call)
and ``W_hi``, ``W_lo`` the weights held in the high and low nibbles::

    y  = x_e @ W_hi.T + x_o @ W_lo.T
    W_hi.T[j, n] = book[codes[n, j] >> 4] * absmax_t[2j // bs, n]

``absmax_t`` is the scale laid out ``(K / blocksize, N)``: a block's scales form one
lane-dense row, repeated down ``bs / 2`` sublanes. Grid ``(M, N, K)`` tiles with the K axis
last and sequential, accumulating in a float32 VMEM scratch. The backward ``dx = dy @ W``
uses the same tiles: ``dx_e = dy @ W_hi``, ``dx_o = dy @ W_lo``, interleaved afterwards.

Tiles must divide the reduction axis exactly (K forward, N backward); edge tiles of the
other axes only produce rows or columns that are discarded.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jqlora.kernels.lookup import KernelWeight, kernel_weight, out_struct, select_tree, vary_alike
from jqlora.quant import QuantizedTensor


class Tiles(NamedTuple):
    """Tile sizes in weight elements: ``bm`` rows of x, ``bn`` output features, ``bk`` inputs."""

    bm: int
    bn: int
    bk: int


def _divisor(total: int, candidates, ok) -> int:
    return next((c for c in candidates if total % c == 0 and ok(c)), total)


def pick_tiles(m: int, w: KernelWeight, *, reduce_n: bool = False) -> Tiles:
    """Tiles that satisfy Mosaic's (8, 128) block rule: aligned sizes or the full dimension."""
    bm = m if m <= 256 else 256
    # bk divides K in whole blocks (the scales of one K step are one block of absmax_t),
    # and bk / 2 bytes of codes fill whole 128-lane rows.
    bk = _divisor(w.k, (2048, 1024, 512, 256), lambda c: c % w.blocksize == 0)
    if reduce_n:
        bn = _divisor(w.n, (512, 256, 128), lambda c: True)
    else:
        bn = 256 if w.n > 256 else w.n
    return Tiles(bm, bn, bk)


def _weight_halves_t(c_ref, s_ref, *, w: KernelWeight, dtype):
    """``(W_hi.T, W_lo.T)`` of the current tile, each ``[bk / 2, bn]`` in ``dtype``."""
    packed = c_ref[...].astype(jnp.int32).T  # [bk/2, bn]
    nb, bn = s_ref.shape  # this K step's blocks x output features
    half = w.blocksize // 2
    scale = jnp.broadcast_to(s_ref[...][:, None, :], (nb, half, bn)).reshape(nb * half, bn)
    hi = select_tree(packed >> 4, w.book) * scale
    lo = select_tree(packed & 0xF, w.book) * scale
    return hi.astype(dtype), lo.astype(dtype)


def _forward_kernel(xe_ref, xo_ref, c_ref, s_ref, o_ref, acc_ref, *, w: KernelWeight, dtype):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    hi_t, lo_t = _weight_halves_t(c_ref, s_ref, w=w, dtype=dtype)
    acc_ref[...] += jnp.dot(xe_ref[...], hi_t, preferred_element_type=jnp.float32) + jnp.dot(
        xo_ref[...], lo_t, preferred_element_type=jnp.float32
    )

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _backward_kernel(
    dy_ref, c_ref, s_ref, oe_ref, oo_ref, acc_e_ref, acc_o_ref, *, w: KernelWeight, dtype
):
    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_e_ref[...] = jnp.zeros_like(acc_e_ref)
        acc_o_ref[...] = jnp.zeros_like(acc_o_ref)

    hi_t, lo_t = _weight_halves_t(c_ref, s_ref, w=w, dtype=dtype)
    dy = dy_ref[...]
    nt = (((1,), (1,)), ((), ()))  # dy [bm, bn] . W.T [bk/2, bn] over bn
    acc_e_ref[...] += jax.lax.dot_general(dy, hi_t, nt, preferred_element_type=jnp.float32)
    acc_o_ref[...] += jax.lax.dot_general(dy, lo_t, nt, preferred_element_type=jnp.float32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        oe_ref[...] = acc_e_ref[...].astype(oe_ref.dtype)
        oo_ref[...] = acc_o_ref[...].astype(oo_ref.dtype)


def _check(tiles: Tiles, w: KernelWeight, reduce_n: bool) -> None:
    if w.k % tiles.bk or tiles.bk % w.blocksize or (reduce_n and w.n % tiles.bn):
        raise ValueError(
            f"qmatmul TPU kernel: tiles {tiles} must divide the reduction axis of weight {(w.n, w.k)} in whole blocks of {w.blocksize}"
        )


def _interpret(interpret: bool):
    # Edge tiles of M and N read past the array; those rows and columns are discarded.
    return True if interpret else False


# A block dimension that the kernel does not see (``None`` in older jax).
_SQUEEZED = pl.squeezed if hasattr(pl, "squeezed") else None


def _scales_t(w: KernelWeight, tiles: Tiles) -> jax.Array:
    """absmax as ``(K/bk, bk/bs, N)``: one K step's scales are a whole trailing 2-D block, so
    Mosaic's (8, 128) rule holds for any number of blocks per step."""
    if w.absmax is None:
        raise ValueError("_scales_t needs the weight's arrays, not only its static geometry")
    nb = tiles.bk // w.blocksize
    return w.absmax.T.reshape(w.k // tiles.bk, nb, w.n)


def _weight_specs(tiles: Tiles, w: KernelWeight, index):
    """BlockSpecs of the codes ``[N, K/2]`` and `_scales_t`; index(i, j, t) -> (n, k) tile."""
    nb = tiles.bk // w.blocksize

    def scale_index(*grid):
        n, k = index(*grid)
        return k, 0, n

    return [
        pl.BlockSpec((tiles.bn, tiles.bk // 2), lambda *grid: index(*grid)),
        pl.BlockSpec((_SQUEEZED, nb, tiles.bn), scale_index),
    ]


def matmul(
    x: jax.Array, w: QuantizedTensor, dtype, *, tiles: Tiles | None = None, interpret: bool = False
) -> jax.Array:
    """``x @ dequantize(w).T`` for ``x [M, K]``: ``[M, N]`` in ``dtype`` (float32 accumulate)."""
    kw = kernel_weight(w, x)
    x = vary_alike(x, kw.codes)[0]
    m = x.shape[0]
    tiles = tiles or pick_tiles(m, kw)
    _check(tiles, kw, reduce_n=False)
    pairs = x.astype(dtype).reshape(m, kw.k // 2, 2)
    x_even, x_odd, absmax_t = pairs[..., 0], pairs[..., 1], _scales_t(kw, tiles)
    bm, bn, hk = tiles.bm, tiles.bn, tiles.bk // 2
    x_spec = pl.BlockSpec((bm, hk), lambda i, j, t: (i, t))
    return pl.pallas_call(
        functools.partial(_forward_kernel, w=kw.static(), dtype=dtype),
        out_shape=out_struct((m, kw.n), dtype, x_even, kw.codes, absmax_t),
        grid=(pl.cdiv(m, bm), pl.cdiv(kw.n, bn), kw.k // tiles.bk),
        in_specs=[x_spec, x_spec, *_weight_specs(tiles, kw, lambda i, j, t: (j, t))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, t: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret(interpret),
        name=f"qmatmul_{kw.quant_type}",
    )(x_even, x_odd, kw.codes, absmax_t)


def matmul_t(
    dy: jax.Array, w: QuantizedTensor, dtype, *, tiles: Tiles | None = None, interpret: bool = False
) -> jax.Array:
    """``dy @ dequantize(w)`` for ``dy [M, N]``: ``[M, K]`` in ``dtype`` (float32 accumulate)."""
    kw = kernel_weight(w, dy)
    dy = vary_alike(dy, kw.codes)[0]
    m = dy.shape[0]
    tiles = tiles or pick_tiles(m, kw, reduce_n=True)
    _check(tiles, kw, reduce_n=True)
    bm, bn, hk = tiles.bm, tiles.bn, tiles.bk // 2
    dy, absmax_t = dy.astype(dtype), _scales_t(kw, tiles)
    half = out_struct((m, kw.k // 2), dtype, dy, kw.codes, absmax_t)
    out_spec = pl.BlockSpec((bm, hk), lambda i, t, j: (i, t))
    even, odd = pl.pallas_call(
        functools.partial(_backward_kernel, w=kw.static(), dtype=dtype),
        out_shape=(half, half),
        grid=(pl.cdiv(m, bm), kw.k // tiles.bk, kw.n // bn),
        in_specs=[
            pl.BlockSpec((bm, bn), lambda i, t, j: (i, j)),
            *_weight_specs(tiles, kw, lambda i, t, j: (j, t)),
        ],
        out_specs=(out_spec, out_spec),
        scratch_shapes=[pltpu.VMEM((bm, hk), jnp.float32), pltpu.VMEM((bm, hk), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret(interpret),
        name=f"qmatmul_t_{kw.quant_type}",
    )(dy, kw.codes, absmax_t)
    return jnp.stack([even, odd], axis=-1).reshape(m, kw.k)
