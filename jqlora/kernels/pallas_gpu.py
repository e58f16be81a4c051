"""Fused 4-bit dequantize-matmul for GPUs: a Pallas kernel on the Triton back end.

Forward, ``y = x @ W.T`` (``x [M, K]``, ``W [N, K]``): one program per ``[bm, bn]`` output
tile; a K loop inside the program (a parallel K grid axis would race on the accumulator)::

    for k0 in range(0, K, bk):
        c   = codes[n-tile, k0/2 : (k0+bk)/2]              uint8, two codes a byte
        w   = select_tree(interleave(c >> 4, c & 15))      [bn, bk] code-book values
        w   = w * absmax[n-tile, k0/bs ...] (per block)    then cast to the compute dtype
        acc += x[m-tile, k0 : k0+bk] @ w.T                 tensor cores, float32 accumulate

Backward, ``dx = dy @ W``: one program per ``[bm, bk]`` tile of ``dx``, an N loop inside,
the same dequantized tile. Ragged edges are masked loads (zeros) and masked stores. Only the
packed codes and the float32 scales cross memory: 0.5 + 4/blocksize bytes per weight.

Tile sizes come from `TILES`, keyed by the size of M (decode-like small M is bound by reading
the weight, so it wants many programs over N and long K steps; large M wants big tiles).

Status (an H200, benchmarks/RESULTS.md): exact, but slower than XLA's dequantize-then-dot,
so `qmatmul` uses it on a GPU only when asked. Leads from that table: the backward grid has
``K / bk`` programs when M is small (16 for K = 4096, on 132 multiprocessors), so it wants a
split over N; at large M the kernel reached ~15% of the bf16 tensor-core rate, so the
lookup and scaling, not the ``dot``, set its pace.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jqlora.kernels.lookup import KernelWeight, kernel_weight, out_struct, select_tree, vary_alike
from jqlora.quant import QuantizedTensor


class Tiles(NamedTuple):
    """One kernel configuration: tile sizes (powers of two) and Triton launch parameters."""

    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int


#: ``(max M, tiles)``, first match wins. Starting points for an H100/H200-class GPU, to be
#: re-tuned with ``benchmarks/qmatmul.py --tune`` on the target card.
TILES: tuple[tuple[int, Tiles], ...] = (
    (16, Tiles(bm=16, bn=32, bk=256, num_warps=4, num_stages=4)),
    (64, Tiles(bm=32, bn=64, bk=128, num_warps=4, num_stages=4)),
    (256, Tiles(bm=64, bn=128, bk=64, num_warps=4, num_stages=3)),
    (1 << 62, Tiles(bm=128, bn=128, bk=64, num_warps=8, num_stages=3)),
)


def pick_tiles(m: int, table=TILES) -> Tiles:
    """The table entry for a matmul whose activation has ``m`` rows."""
    return next(tiles for max_m, tiles in table if m <= max_m)


def _mask2(rows: jax.Array, n_rows: int, cols: jax.Array, n_cols: int) -> jax.Array:
    return (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


def _dequant_tile(c_ref, s_ref, n0, k0, *, bn: int, bk: int, w: KernelWeight, dtype):
    """``W[n0 : n0 + bn, k0 : k0 + bk]`` in ``dtype``; zeros past the edges."""
    n_idx = n0 + jnp.arange(bn)
    byte_idx = k0 // 2 + jnp.arange(bk // 2)
    packed = plgpu.load(
        c_ref.at[pl.ds(n0, bn), pl.ds(k0 // 2, bk // 2)],
        mask=_mask2(n_idx, w.n, byte_idx, w.k // 2),
        other=0,
    ).astype(jnp.int32)
    # Element 2j is the high nibble of byte j: interleave (hi, lo) along K.
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(bn, bk)
    values = select_tree(codes, w.book)
    per_tile = max(1, bk // w.blocksize)  # blocks in one K step (1 when a block spans steps)
    b0 = k0 // w.blocksize
    scale = plgpu.load(
        s_ref.at[pl.ds(n0, bn), pl.ds(b0, per_tile)],
        mask=_mask2(n_idx, w.n, b0 + jnp.arange(per_tile), w.k // w.blocksize),
        other=0.0,
    )
    scale = jnp.broadcast_to(scale[:, :, None], (bn, per_tile, bk // per_tile)).reshape(bn, bk)
    return (values * scale).astype(dtype)


def _forward_kernel(x_ref, c_ref, s_ref, o_ref, *, m: int, tiles: Tiles, w: KernelWeight, dtype):
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    m0, n0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    m_idx = m0 + jnp.arange(bm)

    def step(t, acc):
        k0 = t * bk
        x = plgpu.load(
            x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
            mask=_mask2(m_idx, m, k0 + jnp.arange(bk), w.k),
            other=0.0,
        )
        wt = _dequant_tile(c_ref, s_ref, n0, k0, bn=bn, bk=bk, w=w, dtype=dtype)
        return acc + jax.lax.dot_general(
            x, wt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, pl.cdiv(w.k, bk), step, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(
        o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)],
        acc.astype(o_ref.dtype),
        mask=_mask2(m_idx, m, n0 + jnp.arange(bn), w.n),
    )


def _backward_kernel(dy_ref, c_ref, s_ref, o_ref, *, m: int, tiles: Tiles, w: KernelWeight, dtype):
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    m0, k0 = pl.program_id(0) * bm, pl.program_id(1) * bk
    m_idx = m0 + jnp.arange(bm)

    def step(t, acc):
        n0 = t * bn
        dy = plgpu.load(
            dy_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)],
            mask=_mask2(m_idx, m, n0 + jnp.arange(bn), w.n),
            other=0.0,
        )
        wt = _dequant_tile(c_ref, s_ref, n0, k0, bn=bn, bk=bk, w=w, dtype=dtype)
        return acc + jax.lax.dot_general(
            dy, wt, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, pl.cdiv(w.n, bn), step, jnp.zeros((bm, bk), jnp.float32))
    plgpu.store(
        o_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
        acc.astype(o_ref.dtype),
        mask=_mask2(m_idx, m, k0 + jnp.arange(bk), w.k),
    )


def _call(
    kernel, a, w: KernelWeight, out_cols: int, grid_cols: int, dtype, tiles: Tiles, interpret: bool
):
    m = a.shape[0]
    body = functools.partial(kernel, m=m, tiles=tiles, w=w.static(), dtype=dtype)
    return pl.pallas_call(
        body,
        out_shape=out_struct((m, out_cols), dtype, a, w.codes, w.absmax),
        grid=(pl.cdiv(m, tiles.bm), pl.cdiv(out_cols, grid_cols)),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages
        ),
        interpret=interpret,
        name=f"qmatmul_{w.quant_type}",
    )(a, w.codes, w.absmax)


def _check(tiles: Tiles) -> Tiles:
    # Triton tensors are powers of two; with blocksizes also powers of two, a K step then
    # covers whole blocks or a part of one block.
    if any(t < 2 or t & (t - 1) for t in tiles[:3]):
        raise ValueError(f"qmatmul GPU kernel: tile sizes must be powers of two >= 2, got {tiles}")
    return tiles


def matmul(
    x: jax.Array, w: QuantizedTensor, dtype, *, tiles: Tiles | None = None, interpret: bool = False
) -> jax.Array:
    """``x @ dequantize(w).T`` for ``x [M, K]``: ``[M, N]`` in ``dtype`` (float32 accumulate)."""
    kw = kernel_weight(w, x)
    x = vary_alike(x.astype(dtype), kw.codes)[0]
    tiles = _check(tiles or pick_tiles(x.shape[0]))
    return _call(_forward_kernel, x, kw, kw.n, tiles.bn, dtype, tiles, interpret)


def matmul_t(
    dy: jax.Array, w: QuantizedTensor, dtype, *, tiles: Tiles | None = None, interpret: bool = False
) -> jax.Array:
    """``dy @ dequantize(w)`` for ``dy [M, N]``: ``[M, K]`` in ``dtype`` (float32 accumulate)."""
    kw = kernel_weight(w, dy)
    dy = vary_alike(dy.astype(dtype), kw.codes)[0]
    tiles = _check(tiles or pick_tiles(dy.shape[0]))
    return _call(_backward_kernel, dy, kw, kw.k, tiles.bk, dtype, tiles, interpret)
