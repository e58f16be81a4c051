"""`LoraSpec`: the static half of one adapter (its scale and dropout), kept inside the tree.

An adapter entry in the ``lora`` tree is a dict ``{"a": [r, in], "b": [out, r], "spec":
LoraSpec}`` (plus ``"magnitude": [out]`` for DoRA). ``LoraSpec`` is a pytree node with no
children: ``jax.grad``, optax and ``tree_map`` carry it along untouched and never see a
leaf in it, so the scale travels with its adapter without being trained, and a model
needs no LoRA configuration of its own to apply an adapter.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """scale: alpha / r (or alpha / sqrt(r) with rsLoRA). dropout: rate on the LoRA input."""

    scale: float
    dropout: float = 0.0
