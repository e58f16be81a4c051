"""Lowering a function for a GPU or TPU on this CPU, and reading the kernels it calls."""

from __future__ import annotations

import contextlib
import re

import jax

from jqlora.kernels.qmatmul import lowering_for_gpu

TRITON = "__gpu$xla.gpu.triton"


def lowered_text(f, *args, platform: str) -> str:
    """StableHLO text of ``jax.jit(f)`` lowered for ``platform`` ("cuda" or "tpu"); for
    "cuda", traced as for a GPU (`qmatmul.lowering_for_gpu`)."""
    target = lowering_for_gpu() if platform == "cuda" else contextlib.nullcontext()
    with target:
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def custom_calls(text: str) -> list[str]:
    """The targets of every custom call in lowered text, in order."""
    return re.findall(r"custom_call @(\S+)\(", text)


def triton_kernel_names(text: str) -> list[str]:
    """The Pallas kernel name of every Triton call (``pallas_call(name=...)``), in order."""
    names = []
    for line in text.splitlines():
        if f"custom_call @{TRITON}(" in line:
            found = re.search(r'name = \\?"([A-Za-z0-9_]+)\\?"', line)
            names.append(found.group(1) if found else "?")
    return names
