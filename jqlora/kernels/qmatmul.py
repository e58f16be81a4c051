"""`qmatmul`: the one place a (possibly quantized) weight meets an activation.

PLACEHOLDER until the kernels land: dequantize-then-dot. The signature is the contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlora.quant import QuantizedTensor, dequantize


def qmatmul(x: jax.Array, w, *, compute_dtype=None, backend: str | None = None) -> jax.Array:
    """``x @ W.T`` for a weight ``W`` of shape ``[out, in]`` (torch Linear layout).

    ``w`` is a ``QuantizedTensor`` or a plain array. The matmul runs in ``compute_dtype``
    (default: ``x.dtype``) with float32 accumulation, and returns that dtype. No gradient
    flows to a quantized ``w``.
    """
    dtype = jnp.dtype(compute_dtype or x.dtype)
    wd = dequantize(w, dtype) if isinstance(w, QuantizedTensor) else w.astype(dtype)
    if isinstance(w, QuantizedTensor):
        wd = jax.lax.stop_gradient(wd)
    return jnp.einsum("...k,nk->...n", x.astype(dtype), wd, preferred_element_type=jnp.float32).astype(dtype)
