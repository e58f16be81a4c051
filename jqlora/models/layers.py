"""The layers every architecture shares: embeddings, norms, activations, soft-capping.

Parameter names follow PyTorch (``weight``, ``bias``) so a params path is the Hugging Face
parameter name split on dots.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jqlora.lora.linear import Linear

__all__ = [
    "ACTIVATIONS",
    "Embed",
    "LayerNorm",
    "Linear",
    "RMSNorm",
    "activation",
    "gated_activation",
    "head_scale",
    "soft_cap",
]


class Embed(nn.Module):
    """Token or position embedding table ``weight: [num, features]``; never quantized."""

    num: int
    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.normal(0.02), (self.num, self.features))
        return jnp.take(weight, ids, axis=0).astype(self.dtype or weight.dtype)


class RMSNorm(nn.Module):
    """``w * (x / sqrt(mean(x^2) + eps))``, the normalisation in float32 (as transformers).

    ``offset=1`` is Gemma's norm ``(1 + w) * normed``, where the product too is float32 and
    rounded once (its weight starts at zero); otherwise ``w`` and the normed ``x`` meet in
    the compute dtype, as in Llama.
    """

    eps: float = 1e-6
    dtype: jnp.dtype | None = None
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],))
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + weight.astype(jnp.float32))).astype(dtype)
        return weight.astype(dtype) * normed.astype(dtype)


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` in float32; no params when not affine."""

    eps: float = 1e-5
    affine: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.param("weight", nn.initializers.ones, (x.shape[-1],)).astype(jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],)).astype(jnp.float32)
        return y.astype(dtype)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_activation(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """``act(gate) * up`` (a gated MLP's hidden state) in float32, rounded once to gate's dtype.

    bfloat16 arithmetic on a CPU rounds after every operation; here the whole expression runs
    in float32. The backward pass keeps ``gate`` and ``up`` in their own dtype and recomputes
    the float32 values, where autodiff would keep both in float32 (twice the memory).
    """
    return (ACTIVATIONS[name](gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _gated_fwd(name, gate, up):
    return gated_activation(name, gate, up), (gate, up)


def _gated_bwd(name, residuals, d_out):
    gate, up = residuals
    act, act_vjp = jax.vjp(ACTIVATIONS[name], gate.astype(jnp.float32))
    d_out = d_out.astype(jnp.float32)
    (d_gate,) = act_vjp(d_out * up.astype(jnp.float32))
    return d_gate.astype(gate.dtype), (d_out * act).astype(up.dtype)


gated_activation.defvjp(_gated_fwd, _gated_bwd)


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping), in x's dtype."""
    return (jnp.tanh(x / cap) * cap).astype(x.dtype)


def head_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
