"""`QuantizedTensor`: a 4-bit blockwise-quantized array that is a JAX pytree.

Its bytes are the bitsandbytes layout, so a tensor moves between jqlora and
transformers + bitsandbytes without being dequantized:

* the original array is flattened row-major and cut into blocks of ``blocksize``
  consecutive elements (blocks run across rows when a row is not a multiple of the block);
* each block stores ``absmax = max |w|`` and every element the 4-bit index of the code-book
  value nearest to ``w / absmax``; two codes share a byte, the even-index element in the
  HIGH nibble; an odd element count is padded with one 0.0, which is quantized too;
* with double quantization the absmax values themselves are stored as 8-bit codes of
  ``absmax - offset`` (``offset = mean(absmax)``) in blocks of 256, each with its own f32
  ``nested_absmax``.

``codes`` is kept 2-D, ``[rows, cols // 2]`` with ``rows = prod(shape[:-1])``, whenever the
last dimension is even, so that sharding along either axis of a weight matrix never cuts a
byte; the flat order is the same either way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.quant.codebooks import NESTED_BLOCKSIZE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A 4-bit (NF4 or FP4) blockwise-quantized array, byte-compatible with bitsandbytes.

    Array children (what ``jit``, ``shard_map`` and checkpoints see):
      codes: uint8, two 4-bit codes per byte; ``[rows, cols // 2]`` or flat ``[ceil(n / 2)]``.
      absmax: ``[n_blocks]``; float32, or uint8 codes when double-quantized.
      nested_absmax: float32 ``[ceil(n_blocks / 256)]`` with double quantization, else None.
      offset: float32 scalar (the mean of the absmax values) with double quantization, else None.

    Static fields: ``shape`` and ``dtype`` of the original array, ``quant_type`` ("nf4" or
    "fp4") and ``blocksize``.
    """

    codes: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))
    quant_type: str = dataclasses.field(metadata=dict(static=True))
    blocksize: int = dataclasses.field(metadata=dict(static=True))

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.blocksize)

    @property
    def nested_blocksize(self) -> int:
        return NESTED_BLOCKSIZE

    @property
    def nbytes(self) -> int:
        """Bytes actually stored by the arrays (codes, scales and their constants)."""
        arrays = (self.codes, self.absmax, self.nested_absmax, self.offset)
        return sum(
            int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays if a is not None
        )

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.size

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedTensor(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
            f"quant_type={self.quant_type!r}, blocksize={self.blocksize}{dq})"
        )


def check_layout(qt: QuantizedTensor, name: str = "tensor") -> None:
    """Raise a ValueError naming ``name`` unless ``qt``'s arrays hold what its shape needs.

    A `QuantizedTensor` built by hand (or from a file that lies about its shape) can carry
    fewer codes or scales than ``shape`` and ``blocksize`` imply; computing with it would
    read past the data or silently misalign the blocks. Shapes only: works under ``jit``.
    """
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"{name}: expected a QuantizedTensor, got {type(qt).__name__}")
    n, n_blocks = qt.size, qt.n_blocks
    codes_size = math.prod(qt.codes.shape)
    problems = []
    if np.dtype(qt.codes.dtype) != np.uint8:
        problems.append(f"codes have dtype {np.dtype(qt.codes.dtype).name}, not uint8")
    if codes_size != (n + 1) // 2:
        problems.append(f"{codes_size} code bytes where shape {qt.shape} needs {(n + 1) // 2}")
    if math.prod(qt.absmax.shape) != n_blocks:
        problems.append(
            f"{math.prod(qt.absmax.shape)} absmax values where {n_blocks} blocks of "
            f"{qt.blocksize} need {n_blocks}"
        )
    if qt.nested_absmax is not None:  # double-quantized
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        if math.prod(qt.nested_absmax.shape) != n_nested:
            problems.append(
                f"{math.prod(qt.nested_absmax.shape)} nested_absmax values where {n_nested} "
                "are needed"
            )
        if qt.offset is None:
            problems.append("nested_absmax without an offset")
    if problems:
        raise ValueError(f"{name}: inconsistent QuantizedTensor: {'; '.join(problems)}")


def codes_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of the packed codes for an array of ``shape`` (see module doc)."""
    n = math.prod(shape)
    if len(shape) >= 2 and shape[-1] % 2 == 0:
        return (n // shape[-1], shape[-1] // 2)
    return ((n + 1) // 2,)
