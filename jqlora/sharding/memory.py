"""A one-device memory estimate as the figures of each device of a mesh."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jqlora.sharding.mesh import BATCH_AXES, parse_mesh

MODEL_SPLIT = (
    "base weights",
    "LoRA parameters",
    "LoRA gradients",
    "optimizer state",
    "weight gradients",
    "f32 master weights",
)
BATCH_SPLIT = ("activations", "logits + loss")


def per_device(estimate, mesh_axes: Mapping[str, int] | str):
    """A ``jqlora.memory.MemoryEstimate`` (one device) as the figures of each device of a mesh.

    Per column, ``device[k] / (fsdp * tensor)`` for the weights, adapters, their gradients
    and the optimizer state (``MODEL_SPLIT``; also the host-offloaded optimizer state),
    ``device[k] / (data * fsdp)`` for activations and logits (``BATCH_SPLIT``; tensor
    parallelism splits most activations too, but not the residual stream, so it is not
    counted: an upper bound); anything else (the XLA back end's dequantize scratch) is
    kept whole. Not counted: XLA's transient gather of one layer's weights under FSDP.
    """
    axes = parse_mesh(mesh_axes) if isinstance(mesh_axes, str) else dict(mesh_axes)
    if any(v < 1 for v in axes.values()):
        raise ValueError(f"mesh {axes}: per-device figures need every axis size (no -1)")
    model = math.prod(axes.get(a, 1) for a in ("fsdp", "tensor"))
    batch = math.prod(axes.get(a, 1) for a in BATCH_AXES)

    def split(parts: dict) -> dict:
        return {
            k: -(-v // model) if k in MODEL_SPLIT else -(-v // batch) if k in BATCH_SPLIT else v
            for k, v in parts.items()
        }

    columns = tuple(
        dataclasses.replace(c, device=split(c.device), host=split(c.host)) for c in estimate.columns
    )
    return dataclasses.replace(estimate, columns=columns)
