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


def _chunk_rows(n_rows: int, k: int, blocksize: int) -> int:
    """Rows per chunk: a multiple of the rows that make whole blocks, near `chunk_elements`."""
    align = blocksize // math.gcd(k, blocksize)
    rows = max(align, (chunk_elements() // k) // align * align)
    return min(rows, n_rows)


def _rows(w: QuantizedTensor, start: int, count: int) -> QuantizedTensor:
    """Rows ``[start, start + count)`` of ``w`` (float absmax), as a `QuantizedTensor`."""
    n_rows, k = w.shape
    e0, e1 = start * k, (start + count) * k
    if w.codes.ndim == 2:
        codes = w.codes[start : start + count]
    else:
        codes = w.codes[e0 // 2 : (e1 + 1) // 2]
    absmax = w.absmax[e0 // w.blocksize : -(-e1 // w.blocksize)]
    return dataclasses.replace(w, codes=codes, absmax=absmax, shape=(count, k))


def _stacked_chunks(w: QuantizedTensor, rows: int, n_chunks: int) -> QuantizedTensor:
    """The first ``n_chunks * rows`` rows of ``w`` with a leading chunk axis on each array."""
    head = _rows(w, 0, n_chunks * rows)
    codes = head.codes.reshape(n_chunks, -1, *head.codes.shape[1:])
    absmax = head.absmax.reshape(n_chunks, -1)
    return dataclasses.replace(head, codes=codes, absmax=absmax, shape=(rows, w.shape[1]))


def _split(w: QuantizedTensor):
    """``(chunks, tail)``: scanned row chunks (or None) and the leftover rows (or None)."""
    n_rows, k = w.shape
    rows = _chunk_rows(n_rows, k, w.blocksize)
    n_chunks = n_rows // rows
    if n_chunks <= 1:
        return None, w
    chunks = _stacked_chunks(w, rows, n_chunks)
    tail = _rows(w, n_chunks * rows, n_rows - n_chunks * rows) if n_rows % rows else None
    return chunks, tail


def matmul(x: jax.Array, w: QuantizedTensor, dtype) -> jax.Array:
    """``x @ dequantize(w).T`` for ``x [M, K]``, ``w [N, K]``: ``[M, N]`` in ``dtype``.

    Inputs in ``dtype``, products accumulated in float32.
    """
    w = plain_absmax(local_weight(w))
    x = x.astype(dtype)

    def dot(wc: QuantizedTensor) -> jax.Array:
        wd = dequantize(wc, dtype)
        return jnp.einsum("mk,nk->mn", x, wd, preferred_element_type=jnp.float32).astype(dtype)

    chunks, tail = _split(w)
    parts = []
    if chunks is not None:
        ys = jax.lax.map(dot, chunks)  # [n_chunks, M, rows]
        parts.append(jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], -1))
    if tail is not None:
        parts.append(dot(tail))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def matmul_t(dy: jax.Array, w: QuantizedTensor, dtype) -> jax.Array:
    """``dy @ dequantize(w)`` for ``dy [M, N]``, ``w [N, K]``: ``[M, K]`` in ``dtype``.

    The backward of `matmul` with respect to ``x``; chunk partial sums add up in float32.
    """
    w = plain_absmax(local_weight(w))
    dy = dy.astype(dtype)

    def dot(dyc: jax.Array, wc: QuantizedTensor) -> jax.Array:
        wd = dequantize(wc, dtype)
        return jnp.einsum("mn,nk->mk", dyc, wd, preferred_element_type=jnp.float32)

    chunks, tail = _split(w)
    total = jnp.zeros((dy.shape[0], w.shape[1]), jnp.float32)
    done = 0
    if chunks is not None:
        n_chunks, rows = chunks.absmax.shape[0], chunks.shape[0]
        done = n_chunks * rows
        dys = jnp.moveaxis(dy[:, :done].reshape(dy.shape[0], n_chunks, rows), 1, 0)

        def step(acc, xs):
            dyc, wc = xs
            return acc + dot(dyc, wc), None

        total, _ = jax.lax.scan(step, total, (dys, chunks))
    if tail is not None:
        total = total + dot(dy[:, done:], tail)
    return total.astype(dtype)
