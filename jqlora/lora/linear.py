"""`Linear`: the linear layer every model uses; a frozen (maybe 4-bit) base plus LoRA.

    y = qmatmul(x, W) + bias + scale * (dropout(x) @ a.T @ b.T)

``W`` is ``[out, in]`` (torch layout) and may be a ``QuantizedTensor``; the LoRA branch is
taken when the ``"lora"`` collection holds an entry for this module (see ``spec.py``).
An entry that also holds ``"magnitude"`` is a DoRA adapter (see ``dora.py``).
Dropout runs only when the caller passes a ``"dropout"`` rng.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jqlora.kernels import qmatmul
from jqlora.kernels.lookup import vary_alike
from jqlora.lora.branch import dropout, dropout_seed, lora_delta
from jqlora.lora.dora import dora_linear
from jqlora.quant import QuantizedTensor

ADAPTER_KEYS = ("a", "b", "spec")
DORA_KEY = "magnitude"


def lora_dropout(x: jax.Array, rate: float, rng) -> jax.Array | None:
    """Inverted dropout of ``x`` at ``rate`` (``branch.dropout``), or None when no dropout
    runs (no rng, or rate 0)."""
    if rng is None or rate <= 0.0:
        return None
    return dropout(x, dropout_seed(rng), rate)


def lora_branch(x: jax.Array, adapter: dict, *, dropout_rng=None) -> jax.Array:
    """``scale * (dropout(x) @ a.T @ b.T)`` in x's dtype (backward pass: ``branch.py``)."""
    spec = adapter["spec"]
    a, b = adapter["a"], adapter["b"]  # cast to x's dtype inside, float32 gradients out
    use_dropout = dropout_rng is not None and spec.dropout > 0.0
    seed = dropout_seed(dropout_rng) if use_dropout else None
    # Under shard_map, a replicated adapter meets sharded activations: typed alike, autodiff
    # sums the adapter's gradient over the shards (the transpose of the cast).
    x, a, b = vary_alike(x, a, b)
    return lora_delta(x, a, b, seed, float(spec.scale), float(spec.dropout))


class Linear(nn.Module):
    """A linear layer in torch orientation whose weight may be quantized."""

    features: int
    use_bias: bool = False
    dtype: jnp.dtype | None = None  # compute dtype; default: the input's

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if self.has_variable("params", "weight"):
            # Read directly: flax's shape check would compare a QuantizedTensor's packed
            # codes against the float shape and refuse.
            weight: jax.Array | QuantizedTensor = self.get_variable("params", "weight")
        else:
            weight = self.param(
                "weight", nn.initializers.lecun_normal(), (self.features, in_features)
            )
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = qmatmul(x, weight, compute_dtype=dtype)
        if self.has_variable("lora", "a"):
            adapter: dict[str, Any] = {k: self.get_variable("lora", k) for k in ADAPTER_KEYS}
            rng = self.make_rng("dropout") if self.has_rng("dropout") else None
            if self.has_variable("lora", DORA_KEY):
                adapter[DORA_KEY] = self.get_variable("lora", DORA_KEY)
                dropped = lora_dropout(x, adapter["spec"].dropout, rng)
                y = dora_linear(x, y, weight, adapter, dropped)
            else:
                y = y + lora_branch(x, adapter, dropout_rng=rng)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
        return y
