"""Dotted Hugging Face names <-> nested params trees, and what a model expects to load.

A params path is the HF parameter name split on dots, so ``flatten`` and ``unflatten`` are
the whole name map; ``expected_params`` asks the model itself which tensors (and shapes) it
has and which of its modules are linear layers (the ones quantization applies to).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jqlora.lora.linear import Linear


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": x}}`` -> ``{"a.b": x}``; a ``QuantizedTensor`` is one leaf."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict) -> dict:
    """Inverse of ``flatten``."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


@dataclasses.dataclass(frozen=True)
class ExpectedParams:
    shapes: dict  # dotted param name -> shape
    linear_modules: frozenset  # dotted names of Linear modules

    def is_linear_weight(self, name: str) -> bool:
        module, _, leaf = name.rpartition(".")
        return leaf == "weight" and module in self.linear_modules


def expected_params(model: nn.Module) -> ExpectedParams:
    """The params a model will ask for, found by tracing ``init`` without computing anything."""
    linear = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            linear.add(".".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    flat = flatten(shapes["params"])
    return ExpectedParams({k: tuple(v.shape) for k, v in flat.items()}, frozenset(linear))
