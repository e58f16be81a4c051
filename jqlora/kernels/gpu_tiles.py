"""Which GPU kernel runs a product of M activation rows, and with which tiles, per GPU.

The one table of crossover points and tile sizes of the GPU back end. Rows ``(max M,
kernel, tiles)``, first match wins, one tuple per direction: ``"fwd"`` is ``x @ W.T``,
``"bwd"`` is ``dx = dy @ W``. Kernels:

* ``"gemv"`` (`gpu_gemv`): CUDA-core kernel reading the packed weight once; for small M.
* ``"dequant"`` (`pallas_gpu`): dequantize to the compute dtype, then XLA's ``dot``.

The rows are starting points until ``python benchmarks/qmatmul.py --tune`` has run on the
card: it times both kernels over these candidates and prints a replacement table.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class GemvTiles(NamedTuple):
    """GEMV tiles: ``bn`` rows of W per step, ``bk`` inputs per step (a multiple of the
    blocksize), split of the reduction axis chosen to reach ``programs`` programs."""

    bn: int
    bk: int
    programs: int
    num_warps: int


class DequantTiles(NamedTuple):
    """Dequantize tiles: ``elements`` weights per program (whole blocks)."""

    elements: int
    num_warps: int


class Route(NamedTuple):
    max_m: int
    kernel: str
    tiles: GemvTiles | DequantTiles


KERNELS = ("gemv", "dequant")
ANY_M = 1 << 62
_STARTING_POINT: dict[str, tuple[Route, ...]] = {
    "fwd": (
        Route(4, "gemv", GemvTiles(bn=4, bk=512, programs=1024, num_warps=4)),
        Route(ANY_M, "dequant", DequantTiles(elements=8192, num_warps=4)),
    ),
    "bwd": (
        Route(4, "gemv", GemvTiles(bn=16, bk=256, programs=1024, num_warps=4)),
        Route(ANY_M, "dequant", DequantTiles(elements=8192, num_warps=4)),
    ),
}
#: GPU name -> direction -> routes. ``--tune`` output replaces a GPU's entry.
TABLES: dict[str, dict[str, tuple[Route, ...]]] = {
    "H100": _STARTING_POINT,
    "H200": _STARTING_POINT,
    "default": _STARTING_POINT,
}


#: GPUs whose rows came from ``--tune`` on that card. Until a GPU is listed here its
#: automatic back end is the XLA path: the Pallas kernels are exact in interpret mode and
#: lower for CUDA, but have not yet been compiled and timed on a GPU (benchmarks/RESULTS.md);
#: ``JQLORA_QMATMUL=pallas`` opts in meanwhile.
TUNED: frozenset[str] = frozenset()


def tuned(device_kind: str | None = None) -> bool:
    """Whether this GPU's table was measured on it (``--tune``), so its kernels are the default."""
    return gpu_name(device_kind) in TUNED


def gpu_name(device_kind: str | None = None) -> str:
    """The `TABLES` key for a device kind (``jax.devices()[0].device_kind`` by default)."""
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    return next((name for name in TABLES if name != "default" and name in device_kind), "default")


def route(m: int, direction: str, device_kind: str | None = None) -> Route:
    """The table row for a product with ``m`` activation rows (``direction`` fwd or bwd)."""
    return next(r for r in TABLES[gpu_name(device_kind)][direction] if m <= r.max_m)
