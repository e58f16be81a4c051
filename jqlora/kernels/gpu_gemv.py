"""GEMV kernels for small M (decoding): the packed weight read once, products on CUDA cores.

Forward ``y = x @ W.T``, ``x [M, K]`` with M <= a few rows, ``W [N, K]``. Grid ``(N / bn,
S)``: a program owns ``bn`` rows of W and one of ``S`` slices of K (split-K), walking it
``bk`` inputs a step. With ``x_e = x[:, 0::2]``, ``x_o = x[:, 1::2]`` (x loaded contiguously
and split in registers) and ``p`` the packed bytes (element 2j in the high nibble)::

    s[m, n, b] = sum_{j in block b} book[p[n, j] >> 4] * x_e[m, j] + book[p[n, j] & 15] * x_o[m, j]
    part[s, m, n] += sum_b s[m, n, b] * absmax[n, b]           (scale once per block)

and XLA sums the ``S`` float32 partials (a fixed order: deterministic).

Backward ``dx = dy @ W`` at small M, grid ``(K / bk, S)`` with the split over N, no
transpose of W: a program owns ``bk`` columns and walks ``bn`` rows a step::

    t[m, n, b]      = dy[m, n] * absmax[n, b]                  (once per block)
    dx_e[m, j]     += sum_n t[m, n, b(j)] * book[p[n, j] >> 4]  (dx_o likewise, low nibble)

then ``dx_e``, ``dx_o`` interleave into ``dx``. Ragged edges: masked loads give zeros (x and
dy beyond their edges are zero, so padded weight values add nothing), masked stores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jqlora.kernels.gpu_tiles import GemvTiles
from jqlora.kernels.lookup import block_scales, book_operand, out_struct, scale_operands, vary_alike
from jqlora.quant import QuantizedTensor


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _edge_mask(rows, n_rows: int, cols, n_cols: int, ragged: tuple[bool, bool]):
    """``rows < n_rows`` and ``cols < n_cols`` as a 2-D mask, tested only along the axes
    whose tiles can run past the edge (``ragged``); None when neither can."""
    shape = (rows.shape[0], cols.shape[0])
    parts = [
        jnp.broadcast_to(live, shape)
        for live, check in (
            ((rows < n_rows)[:, None], ragged[0]),
            ((cols < n_cols)[None], ragged[1]),
        )
        if check
    ]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] & parts[1]


def _masked_load(ref, mask):
    """``ref``'s tile, zeros where ``mask`` is false (no mask: all of it)."""
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


def _lookup(codes_ref, book_ref, n0, k0, *, bn: int, bk: int, n: int, k: int, ragged):
    """``(hi, lo)``: the code-book values of ``W[n0 : n0 + bn, k0 : k0 + bk]``'s even and
    odd columns, each ``[bn, bk / 2]`` float32 (padding codes read as 0)."""
    rows = n0 + jnp.arange(bn)
    cols = k0 // 2 + jnp.arange(bk // 2)
    packed = _masked_load(
        codes_ref.at[pl.ds(n0, bn), pl.ds(k0 // 2, bk // 2)],
        _edge_mask(rows, n, cols, k // 2, ragged),
    ).astype(jnp.int32)
    return book_ref[packed >> 4], book_ref[packed & 0xF]


def _scales(scale_refs, n0, k0, *, bn: int, bk: int, n: int, k: int, blocksize: int, ragged):
    """``[bn, bk / blocksize]`` float32 scales of the tile's blocks (clamped at the edges)."""
    per_row = k // blocksize
    rows = n0 + jnp.arange(bn)
    cols = k0 // blocksize + jnp.arange(bk // blocksize)
    rows = jnp.minimum(rows, n - 1) if ragged[0] else rows
    cols = jnp.minimum(cols, per_row - 1) if ragged[1] else cols
    return block_scales(scale_refs, rows[:, None] * per_row + cols[None, :])


def _load_rows(ref, c0, *, pm: int, m: int, width: int, limit: int, ragged: bool):
    """``ref[:pm, c0 : c0 + width]`` as float32, zero past ``m`` rows or ``limit`` columns."""
    mask = _edge_mask(jnp.arange(pm), m, c0 + jnp.arange(width), limit, (pm > m, ragged))
    return _masked_load(ref.at[pl.ds(0, pm), pl.ds(c0, width)], mask).astype(jnp.float32)


def _store_rows(ref, split, c0, value, *, m: int, limit: int):
    """``ref[split, :m, c0 : c0 + width] = value[:m]``, nothing past ``limit`` columns."""
    pm, width = value.shape
    cols = c0 + jnp.arange(width)
    mask = (jnp.arange(pm) < m)[:, None] & (cols < limit)[None, :]
    plgpu.store(ref.at[split, pl.ds(0, pm), pl.ds(c0, width)], value, mask=mask)


def _forward_kernel(x_ref, codes_ref, book_ref, *refs, m, n, k, bs, tiles, steps, pm, ragged):
    *scale_refs, out_ref = refs
    bn, bk = tiles.bn, tiles.bk
    n0 = pl.program_id(0) * bn
    split = pl.program_id(1)
    geometry = dict(bn=bn, bk=bk, n=n, k=k, ragged=ragged)

    def step(t, acc):
        k0 = (split * steps + t) * bk
        x = _load_rows(x_ref, k0, pm=pm, m=m, width=bk, limit=k, ragged=ragged[1])
        x_even, x_odd = jax.lax.unstack(x.reshape(pm, bk // 2, 2), axis=2)
        hi, lo = _lookup(codes_ref, book_ref, n0, k0, **geometry)
        prod = hi[None] * x_even[:, None] + lo[None] * x_odd[:, None]  # [pm, bn, bk / 2]
        block_sums = prod.reshape(pm, bn, bk // bs, bs // 2).sum(axis=3)
        scale = _scales(scale_refs, n0, k0, blocksize=bs, **geometry)
        return acc + (block_sums * scale[None]).sum(axis=2)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((pm, bn), jnp.float32))
    _store_rows(out_ref, split, n0, acc, m=m, limit=n)


def _backward_kernel(dy_ref, codes_ref, book_ref, *refs, m, n, k, bs, tiles, steps, pm, ragged):
    *scale_refs, out_ref = refs
    bn, bk = tiles.bn, tiles.bk
    k0 = pl.program_id(0) * bk
    split = pl.program_id(1)
    geometry = dict(bn=bn, bk=bk, n=n, k=k, ragged=ragged)

    def step(t, acc):
        acc_even, acc_odd = acc
        n0 = (split * steps + t) * bn
        dy = _load_rows(dy_ref, n0, pm=pm, m=m, width=bn, limit=n, ragged=ragged[0])
        hi, lo = _lookup(codes_ref, book_ref, n0, k0, **geometry)
        scale = _scales(scale_refs, n0, k0, blocksize=bs, **geometry)  # [bn, bk / bs]
        t_blocks = dy[:, :, None] * scale[None]  # [pm, bn, bk / bs]
        t_elems = jnp.broadcast_to(t_blocks[..., None], (pm, bn, bk // bs, bs // 2))
        t_elems = t_elems.reshape(pm, bn, bk // 2)
        return (
            acc_even + (t_elems * hi[None]).sum(axis=1),
            acc_odd + (t_elems * lo[None]).sum(axis=1),
        )

    zeros = jnp.zeros((pm, bk // 2), jnp.float32)
    acc_even, acc_odd = jax.lax.fori_loop(0, steps, step, (zeros, zeros))
    dx = jnp.stack([acc_even, acc_odd], axis=-1).reshape(pm, bk)
    _store_rows(out_ref, split, k0, dx, m=m, limit=k)


def _check(tiles: GemvTiles, blocksize: int) -> None:
    if tiles.bn & (tiles.bn - 1) or tiles.bk & (tiles.bk - 1) or tiles.bk < blocksize:
        raise ValueError(
            f"GEMV kernel: bn and bk must be powers of two, bk >= blocksize {blocksize}: {tiles}"
        )


def _call(kernel, a, w: QuantizedTensor, dtype, tiles: GemvTiles, interpret: bool, *, fwd: bool):
    """Run ``kernel`` on ``a`` (x or dy) and sum its split partials: ``[M, N or K]``."""
    n, k = int(w.codes.shape[0]), 2 * int(w.codes.shape[1])
    _check(tiles, w.blocksize)
    m = a.shape[0]
    out_cols, own, tile_own, walk, tile_walk = (n, n, tiles.bn, k, tiles.bk)
    if not fwd:
        out_cols, own, tile_own, walk, tile_walk = (k, k, tiles.bk, n, tiles.bn)
    owners = pl.cdiv(own, tile_own)
    total_steps = pl.cdiv(walk, tile_walk)
    splits = max(1, min(total_steps, pl.cdiv(tiles.programs, owners)))
    steps = pl.cdiv(total_steps, splits)
    splits = pl.cdiv(total_steps, steps)  # no empty split
    own_ragged = own % tile_own != 0
    walk_ragged = splits * steps * tile_walk != walk
    ragged = (own_ragged, walk_ragged) if fwd else (walk_ragged, own_ragged)  # (N, K) axes
    operands = vary_alike(a.astype(dtype), w.codes, book_operand(w.quant_type), *scale_operands(w))
    body = functools.partial(
        kernel,
        m=m,
        n=n,
        k=k,
        bs=w.blocksize,
        tiles=tiles,
        steps=steps,
        pm=_pow2_ceil(m),
        ragged=ragged,
    )
    parts = pl.pallas_call(
        body,
        out_shape=out_struct((splits, m, out_cols), jnp.float32, *operands),
        grid=(owners, splits),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=2),
        interpret=interpret,
        name=f"gemv{'' if fwd else '_t'}_{w.quant_type}",
    )(*operands)
    return parts.sum(axis=0).astype(dtype)


def matmul(x: jax.Array, w: QuantizedTensor, dtype, *, tiles: GemvTiles, interpret=False):
    """``x @ dequantize(w).T`` for ``x [M, K]``: ``[M, N]`` in ``dtype`` (float32 accumulate)."""
    return _call(_forward_kernel, x, w, dtype, tiles, interpret, fwd=True)


def matmul_t(dy: jax.Array, w: QuantizedTensor, dtype, *, tiles: GemvTiles, interpret=False):
    """``dy @ dequantize(w)`` for ``dy [M, N]``: ``[M, K]`` in ``dtype`` (float32 accumulate)."""
    return _call(_backward_kernel, dy, w, dtype, tiles, interpret, fwd=False)
