"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT 0.21 computes it.

The adapted weight is split into a direction and a trained magnitude ``m`` [out]::

    W' = m / ||W + s B A||_row  *  (W + s B A)          (s = the adapter's scale)

where ``||.||_row`` is the L2 norm of each output row. As in the paper (sec. 4.3) and
PEFT, the norm is treated as a constant in the backward pass (no gradient through it).
The forward never builds ``W'``; with ``k = m / ||W + s B A||``::

    y = x W^T + (k - 1) * (x_d W^T) + k * s * (x_d A^T B^T)      (+ bias)

with ``x_d`` the dropped-out input (``x_d = x`` without dropout, so the first two terms
are ``k * x W^T``). The norm needs the dequantized weight, computed here in float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jqlora.kernels import qmatmul
from jqlora.quant import QuantizedTensor, dequantize


def float_weight(weight, dtype=jnp.float32) -> jax.Array:
    """The weight as a plain array in ``dtype`` (dequantized when it is a ``QuantizedTensor``)."""
    if isinstance(weight, QuantizedTensor):
        return dequantize(weight, dtype)
    return jnp.asarray(weight).astype(dtype)


def delta_weight(adapter: Mapping) -> jax.Array:
    """``s * B @ A`` in float32, shape [*lead, out, in]."""
    a = adapter["a"].astype(jnp.float32)
    b = adapter["b"].astype(jnp.float32)
    return (b @ a) * jnp.float32(adapter["spec"].scale)


def weight_norm(weight, adapter: Mapping) -> jax.Array:
    """``||W + s B A||`` per output row, float32 [*lead, out]. ``weight`` may be quantized."""
    return jnp.linalg.norm(float_weight(weight) + delta_weight(adapter), axis=-1)


def dora_linear(
    x: jax.Array, base_out: jax.Array, weight, adapter: Mapping, dropped_x: jax.Array | None
) -> jax.Array:
    """DoRA's ``y`` without bias (module doc); ``base_out = x W^T``.

    ``dropped_x`` is the dropped-out input when dropout is active, else None.
    """
    spec = adapter["spec"]
    norm = jax.lax.stop_gradient(weight_norm(jax.lax.stop_gradient(weight), adapter))
    k = (adapter["magnitude"].astype(jnp.float32) / norm).astype(x.dtype)
    xd = x if dropped_x is None else dropped_x
    a, b = adapter["a"].astype(x.dtype), adapter["b"].astype(x.dtype)
    lora_out = ((xd @ a.T) @ b.T) * jnp.asarray(spec.scale, x.dtype)
    if dropped_x is None:
        return k * (base_out + lora_out)
    return base_out + (k - 1) * qmatmul(xd, weight, compute_dtype=x.dtype) + k * lora_out


def merged_dora_weight(weight, adapter: Mapping) -> jax.Array:
    """``m / ||W + s B A|| * (W + s B A)`` in float32, as PEFT's ``merge`` folds DoRA in."""
    w = float_weight(weight) + delta_weight(adapter)
    return (adapter["magnitude"].astype(jnp.float32) / jnp.linalg.norm(w, axis=-1))[..., None] * w
