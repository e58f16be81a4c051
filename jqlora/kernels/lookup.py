"""Pieces the Pallas kernels share: the code-book lookup and the kernel-side weight layout.

GPU (Triton) kernels read a code's value with a gather-load from the 16-entry code book
passed as an input (`book_operand`): ``book_ref[c]``, one load per value, served by the L1
cache. They decode a block's scale themselves (`block_scales`), once per block::

    absmax[b] = DYNAMIC[q[b]] * nested[b // 256] + offset     (double quantization)
    absmax[b] = absmax_f32[b]                                  (plain)

TPU (Mosaic) kernels cannot gather from a 16-entry table in registers, so there a
4-bit code ``c = b3 b2 b1 b0`` is looked up with a 4-level select tree::

    level 1: t_j = b0 ? book[2j + 1] : book[2j]        (8 selects on constants)
    level 2: u_j = b1 ? t[2j + 1]    : t[2j]            (4 selects)
    level 3, 4: likewise on b2, b3                      (2 + 1 selects)

15 selects per value, all on registers; the result equals ``book[c]`` exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.kernels.xla import local_weight, plain_absmax
from jqlora.quant import QuantizedTensor
from jqlora.quant.codebooks import DYNAMIC_SIGNED, NESTED_BLOCKSIZE, codebook


def select_tree(codes: jax.Array, book: np.ndarray) -> jax.Array:
    """``book[codes]`` (float32) for int32 ``codes`` in [0, 16), without a gather."""
    values: list[jax.Array | np.float32] = [np.float32(v) for v in book]
    for bit in range(4):
        take_odd = ((codes >> bit) & 1) != 0
        values = [
            jnp.where(take_odd, values[2 * j + 1], values[2 * j]) for j in range(len(values) // 2)
        ]
    (out,) = values
    return jnp.broadcast_to(out, codes.shape).astype(jnp.float32)


def book_operand(quant_type: str) -> jax.Array:
    """The 16-entry float32 code book, as a kernel operand to gather from."""
    return jnp.asarray(codebook(quant_type), jnp.float32)


def scale_operands(w: QuantizedTensor) -> tuple[jax.Array, ...]:
    """The arrays a GPU kernel decodes block scales from, flat over blocks.

    Double-quantized: ``(q uint8 [n_blocks], nested f32 [n_nested], offset f32 [1],
    DYNAMIC f32 [256])``; otherwise ``(absmax f32 [n_blocks],)``. Nothing is decoded here.
    """
    if w.nested_absmax is None:
        return (w.absmax.reshape(-1).astype(jnp.float32),)
    if w.offset is None:
        raise ValueError("a double-quantized tensor needs its offset")
    return (
        w.absmax.reshape(-1),
        w.nested_absmax.reshape(-1).astype(jnp.float32),
        jnp.asarray(w.offset, jnp.float32).reshape(1),
        jnp.asarray(DYNAMIC_SIGNED, jnp.float32),
    )


def block_scales(scale_refs, blocks: jax.Array) -> jax.Array:
    """float32 absmax of the flat block indices ``blocks`` (int32, any shape, in range).

    Inside a kernel: ``scale_refs`` are the refs of `scale_operands`. The double-quantized
    product may round as one FMA with the offset (one ulp of the scale at most).
    """
    if len(scale_refs) == 1:
        return scale_refs[0][blocks]
    q_ref, nested_ref, offset_ref, dynamic_ref = scale_refs
    q = q_ref[blocks].astype(jnp.int32)
    return dynamic_ref[q] * nested_ref[blocks // NESTED_BLOCKSIZE] + offset_ref[0]


def _varying(a) -> frozenset:
    aval = jax.typeof(a)
    if hasattr(aval, "mat"):
        return frozenset(aval.mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary_alike(*operands):
    """``operands``, each made to vary over every manual mesh axis any of them varies over.

    Under ``shard_map`` a replicated activation meets a sharded weight; a ``pallas_call``
    wants its operands typed alike (the interpreter carries them through one loop).
    """
    axes = frozenset().union(*(_varying(a) for a in operands))
    cast = getattr(jax.lax, "pcast", None)
    out = []
    for a in operands:
        missing = tuple(sorted(axes - _varying(a)))
        if missing:
            a = cast(a, missing, to="varying") if cast is not None else jax.lax.pvary(a, missing)
        out.append(a)
    return out


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """A kernel output's shape and dtype, varying over the manual mesh axes its operands vary over.

    ``shard_map`` (with its default ``check_vma``) needs this on every ``pallas_call`` output.
    jax 0.10 names it ``manual_axis_type`` (a ``ManualAxisType``); earlier versions ``vma``.
    """
    avals = [jax.typeof(a) for a in operands]
    varying = frozenset().union(*(_varying(a) for a in operands))
    try:
        if hasattr(avals[0], "mat"):
            mat = type(avals[0].mat)(varying=varying)
            return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
        if hasattr(avals[0], "vma"):
            # jax before 0.10 takes vma; the installed jax's signature may not list it.
            return jax.ShapeDtypeStruct(shape, dtype, vma=varying)  # type: ignore[call-arg]
    except TypeError:  # a jax whose ShapeDtypeStruct takes neither: nothing to declare
        pass
    return jax.ShapeDtypeStruct(shape, dtype)


@dataclasses.dataclass(frozen=True)
class KernelWeight:
    """A weight ``W [N, K]`` as the kernels read it: packed codes and float32 block scales.

    codes: uint8 ``[N, K // 2]`` (element ``2j`` in the high nibble of byte ``j``).
    absmax: float32 ``[N, K // blocksize]``, double quantization already decoded.
    """

    codes: jax.Array | None
    absmax: jax.Array | None
    n: int
    k: int
    blocksize: int
    quant_type: str

    @property
    def book(self) -> np.ndarray:
        return codebook(self.quant_type)

    def static(self) -> KernelWeight:
        """The geometry alone (no arrays), for closing over in a kernel body."""
        return dataclasses.replace(self, codes=None, absmax=None)


def kernel_weight(w: QuantizedTensor, *operands) -> KernelWeight:
    """The `KernelWeight` of ``w``; ``ValueError`` unless blocks lie within rows.

    Its arrays vary over the mesh axes of ``w`` and of the activation ``operands``.
    """
    w = local_weight(w)
    n, k = w.shape
    if w.codes.ndim != 2 or k % w.blocksize:
        raise ValueError(
            f"qmatmul kernels: weight {w.shape} has in_features not a multiple of blocksize "
            f"{w.blocksize}; use the XLA back end"
        )
    absmax = plain_absmax(w).absmax.reshape(n, k // w.blocksize)
    codes, absmax = vary_alike(*operands, w.codes, absmax)[-2:]
    return KernelWeight(codes, absmax, n, k, w.blocksize, w.quant_type)
