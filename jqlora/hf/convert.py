"""One checkpoint tensor -> one params leaf, shared by every checkpoint reader.

``convert_tensor`` checks a tensor against the shape the model expects, casts it and
quantizes it when it is a linear weight the ``QuantConfig`` covers; ``progress_bar`` and
``release_freed_memory`` keep a long load visible and its resident size flat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax.numpy as jnp
import numpy as np

from jqlora.quant import quantize

#: show a progress bar for checkpoints with more tensors than this
PROGRESS_MIN_TENSORS = 16


def progress_bar(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    show = total > PROGRESS_MIN_TENSORS if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit="tensor", disable=not show, leave=False)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Loading interleaves large short-lived float tensors with small long-lived quantized
    ones; without this, glibc keeps the holes the float tensors leave and the resident size
    grows with them instead of with what is kept.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Callable[[int], int] | Literal[False] | None = None


def convert_tensor(array, pname: str, expected, quantization, dtype, *, transpose=False, source=""):
    """One checkpoint tensor -> its params leaf: transposed if stored ``[in, out]``, checked
    against the shape the config implies, cast to ``dtype`` and quantized if it is a linear
    weight that ``quantization`` covers."""
    if transpose:
        array = array.T
    want = expected.shapes[pname]
    if tuple(array.shape) != want:
        raise ValueError(f"{source} has shape {tuple(array.shape)}, but config.json implies {want}")
    if not jnp.issubdtype(array.dtype, jnp.floating):
        # transformers would cast an integer or boolean weight silently: it is a broken file.
        raise ValueError(
            f"{source} has dtype {np.dtype(array.dtype).name}; a weight must be floating-point"
        )
    array = jnp.asarray(array).astype(dtype or array.dtype)
    module = pname.rpartition(".")[0]
    if (
        quantization is not None
        and expected.is_linear_weight(pname)
        and quantization.quantizes(module)
    ):
        return quantize(
            array,
            quantization.quant_type,
            quantization.blocksize,
            quantization.double_quant,
            name=pname,
        )
    return array
