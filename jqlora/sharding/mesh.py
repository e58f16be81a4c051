"""Device meshes for jqlora's placement: the axis names, ``parse_mesh``/``make_mesh``, and
the small helpers that turn spec entries into the mesh's axes of size > 1."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # axes the batch is split over


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``. One size may be ``-1`` (the rest)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(
                f"--mesh {text!r}: expected name=size pairs with names from {AXES}, got {part!r}"
            )
        if name in axes:
            raise ValueError(f"--mesh {text!r}: axis {name!r} given twice")
        try:
            axes[name] = int(size)
        except ValueError:
            raise ValueError(
                f"--mesh {text!r}: size of {name!r} is not an integer: {size!r}"
            ) from None
        if axes[name] < 1 and axes[name] != -1:
            raise ValueError(
                f"--mesh {text!r}: size of {name!r} must be >= 1 or -1, got {axes[name]}"
            )
    if not axes:
        raise ValueError(f"--mesh {text!r}: no axes given")
    if list(axes.values()).count(-1) > 1:
        raise ValueError(f"--mesh {text!r}: at most one axis may be -1")
    return axes


def mesh_arg(text: str) -> dict[str, int]:
    """``parse_mesh`` as an ``argparse`` type (``add_argument("--mesh", type=mesh_arg)``),
    so that a bad value is reported with its reason."""
    import argparse

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def make_mesh(axes: Mapping[str, int] | str | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes).

    ``axes`` maps axis names to sizes (or is a ``parse_mesh`` string); default: all devices
    on ``data``. The sizes must multiply to the device count. Axes are GSPMD ("auto")
    axes: placement comes from the arrays' shardings, not from types.
    """
    devices = list(jax.devices() if devices is None else devices)
    if axes is None:
        axes = {"data": -1}
    if isinstance(axes, str):
        axes = parse_mesh(axes)
    axes = dict(axes)
    known = math.prod(s for s in axes.values() if s != -1)
    if -1 in axes.values():
        if len(devices) % known:
            raise ValueError(
                f"mesh {axes}: {len(devices)} devices do not divide into axes of product {known}"
            )
        axes = {k: (len(devices) // known if s == -1 else s) for k, s in axes.items()}
    if math.prod(axes.values()) != len(devices):
        raise ValueError(
            f"mesh {axes} needs {math.prod(axes.values())} devices, but there are {len(devices)}"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=auto, devices=devices)


def _group(mesh: Mesh, entry) -> tuple[str, ...]:
    """A spec entry as a tuple of the mesh's axes of size > 1."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in names if mesh.shape.get(a, 1) > 1)


def _size(mesh: Mesh, group: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in group)


def _spec(groups: Iterable[tuple[str, ...]]) -> P:
    entries = [g if len(g) > 1 else g[0] if g else None for g in groups]
    while entries and entries[-1] is None:  # P("x", None) == P("x"): keep one spelling
        entries.pop()
    return P(*entries)
