"""The XLA back end of `qmatmul`: dequantize and ``dot``, a chunk of weight rows at a time.

For ``W`` of shape ``[N, K]`` (torch layout) cut into row chunks ``W_c`` of ``r`` rows::

    y[:, c]  = x @ W_c.T                      (forward, one output column chunk per step)
    dx       = sum_c dy[:, c] @ W_c           (backward, accumulated in float32)

A ``lax.scan`` walks the chunks, so only one chunk of the dequantized weight is live at a
time instead of the whole ``[N, K]`` array (XLA would otherwise materialise it, in float32,
before the dot). The double-quantized absmax is decoded once per call, never stored decoded.

Chunks start at block boundaries (``r * K`` is a multiple of the blocksize, so also of the
byte), which keeps every chunk a valid `QuantizedTensor` that `dequantize` understands, for
any ``K`` — also when quantization blocks run across rows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jqlora.quant import QuantizedTensor, decode_absmax, dequantize
from jqlora.quant.codebooks import NESTED_BLOCKSIZE

#: Weight elements dequantized per scan step on a CPU (4 MiB of float32 scratch).
CHUNK_ELEMENTS = 1 << 20
#: The same on a GPU or TPU (64 MiB in float32): every projection of Llama-2-7B is then one
#: dequantize and one ``dot``. Measured on an H200 (benchmarks/RESULTS.md): at M >= 1024 rows
#: the whole-weight product ran 0.45-0.8x a bf16 ``dot``; 2^20-element chunks, 0.1-0.45x.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24


def chunk_elements() -> int:
    """Weight elements per chunk for the platform JAX computes on."""
    return CHUNK_ELEMENTS if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def local_weight(w: QuantizedTensor) -> QuantizedTensor:
    """``w`` with its static shape taken from the arrays it holds.

    Inside ``shard_map`` a `QuantizedTensor` keeps its global static shape while its arrays
    are the local shard; 2-D codes ``[rows, cols // 2]`` give the local ``[rows, cols]``.
    """
    if w.ndim != 2:
        raise ValueError(
            f"qmatmul: the weight must be 2-D [out, in], got a QuantizedTensor of shape {w.shape}"
        )
    shape: tuple[int, ...]
    if w.codes.ndim == 2:
        shape = (int(w.codes.shape[0]), 2 * int(w.codes.shape[1]))
    else:
        shape = w.shape
    n_blocks = -(-math.prod(shape) // w.blocksize)
    if w.absmax.size != n_blocks:
        raise ValueError(
            f"qmatmul: weight codes hold a {shape} matrix ({n_blocks} blocks of {w.blocksize}) "
            f"but absmax has {w.absmax.size} entries; shard the weight only at block boundaries"
        )
    if shape != w.shape:
        w = dataclasses.replace(w, shape=shape)
    return w


def plain_absmax(w: QuantizedTensor) -> QuantizedTensor:
    """``w`` with float32 absmax (double quantization decoded) in a flat ``[n_blocks]``."""
    absmax = decode_absmax(w).reshape(-1).astype(jnp.float32)
    return dataclasses.replace(w, absmax=absmax, nested_absmax=None, offset=None)


def _chunk_rows(n_rows: int, k: int, blocksize: int, nested: bool = False) -> int:
    """Rows per chunk: a multiple of the rows that make whole blocks, near `chunk_elements`.

    ``nested``: whole blocks of the double-quantized absmax too (256 blocks), so that a chunk
    keeps its own slice of ``nested_absmax`` (kernels that decode the absmax themselves).
    """
    unit = blocksize * (NESTED_BLOCKSIZE if nested else 1)
    align = unit // math.gcd(k, unit)
    rows = max(align, (chunk_elements() // k) // align * align)
    return min(rows, n_rows)


def _rows(w: QuantizedTensor, start: int, count: int) -> QuantizedTensor:
    """Rows ``[start, start + count)`` of ``w`` as a `QuantizedTensor`."""
    n_rows, k = w.shape
    e0, e1 = start * k, (start + count) * k
    if w.codes.ndim == 2:
        codes = w.codes[start : start + count]
    else:
        codes = w.codes[e0 // 2 : (e1 + 1) // 2]
    b0, b1 = e0 // w.blocksize, -(-e1 // w.blocksize)
    absmax = w.absmax.reshape(-1)[b0:b1]
    nested = w.nested_absmax
    if nested is not None:
        nested = nested.reshape(-1)[b0 // NESTED_BLOCKSIZE : -(-b1 // NESTED_BLOCKSIZE)]
    return dataclasses.replace(
        w, codes=codes, absmax=absmax, nested_absmax=nested, shape=(count, k)
    )


def _split(w: QuantizedTensor):
    """``(template, stacked, tail)``: the scanned row chunks and the leftover rows.

    ``stacked`` holds the chunks' arrays with a leading chunk axis (or is None) and
    ``template`` the chunk geometry they fill in (`_chunk`); ``tail`` is the rows after the
    last whole chunk (or None).
    """
    n_rows, k = w.shape
    rows = _chunk_rows(n_rows, k, w.blocksize, nested=w.nested_absmax is not None)
    n_chunks = n_rows // rows
    if n_chunks <= 1:
        return None, None, w
    head = _rows(w, 0, n_chunks * rows)
    stacked = {
        name: getattr(head, name).reshape(n_chunks, -1, *getattr(head, name).shape[1:])
        for name in ("codes", "absmax", "nested_absmax")
        if getattr(head, name) is not None
    }
    template = dataclasses.replace(head, shape=(rows, k))
    tail = _rows(w, n_chunks * rows, n_rows - n_chunks * rows) if n_rows % rows else None
    return template, stacked, tail


def _chunk(template: QuantizedTensor, arrays: dict) -> QuantizedTensor:
    return dataclasses.replace(template, **arrays)


def _prepare(w: QuantizedTensor, dequant):
    """``(w, dequant)``: XLA's dequantize takes a decoded absmax; a kernel decodes its own."""
    w = local_weight(w)
    if dequant is None:
        return plain_absmax(w), dequantize
    return w, dequant


def matmul(x: jax.Array, w: QuantizedTensor, dtype, *, dequant=None) -> jax.Array:
    """``x @ dequantize(w).T`` for ``x [M, K]``, ``w [N, K]``: ``[M, N]`` in ``dtype``.

    Inputs in ``dtype``, products accumulated in float32. ``dequant(chunk, dtype)`` makes a
    chunk's ``[rows, K]`` weight (default: XLA's `dequantize`; the GPU passes its kernel).
    """
    w, dequant = _prepare(w, dequant)
    x = x.astype(dtype)

    def dot(wc: QuantizedTensor) -> jax.Array:
        wd = dequant(wc, dtype)
        return jnp.einsum("mk,nk->mn", x, wd, preferred_element_type=jnp.float32).astype(dtype)

    template, stacked, tail = _split(w)
    parts = []
    if stacked is not None:
        ys = jax.lax.map(lambda arrays: dot(_chunk(template, arrays)), stacked)
        parts.append(jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], -1))  # [M, n_chunks * rows]
    if tail is not None:
        parts.append(dot(tail))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def matmul_t(dy: jax.Array, w: QuantizedTensor, dtype, *, dequant=None) -> jax.Array:
    """``dy @ dequantize(w)`` for ``dy [M, N]``, ``w [N, K]``: ``[M, K]`` in ``dtype``.

    The backward of `matmul` with respect to ``x``; chunk partial sums add up in float32.
    The ``dot`` contracts the weight's first axis: no transposed copy of it is made.
    """
    w, dequant = _prepare(w, dequant)
    dy = dy.astype(dtype)

    def dot(dyc: jax.Array, wc: QuantizedTensor) -> jax.Array:
        wd = dequant(wc, dtype)
        return jnp.einsum("mn,nk->mk", dyc, wd, preferred_element_type=jnp.float32)

    template, stacked, tail = _split(w)
    total = jnp.zeros((dy.shape[0], w.shape[1]), jnp.float32)
    done = 0
    if stacked is not None:
        n_chunks, rows = stacked["codes"].shape[0], template.shape[0]
        done = n_chunks * rows
        dys = jnp.moveaxis(dy[:, :done].reshape(dy.shape[0], n_chunks, rows), 1, 0)

        def step(acc, xs):
            dyc, arrays = xs
            return acc + dot(dyc, _chunk(template, arrays)), None

        total, _ = jax.lax.scan(step, total, (dys, stacked))
    if tail is not None:
        total = total + dot(dy[:, done:], tail)
    return total.astype(dtype)
