"""Tuning of this process's runtime for training on a CPU, as an explicit call.

``import jqlora`` changes nothing in the process. A training program on a CPU host calls
`tune_cpu` once, first thing, before JAX starts a back end (its first computation); the
`jqlora` command does so on CPU hosts. See ``jqlora.host_malloc`` and ``jqlora.xla_flags``
for what each setting does, what it costs, and how to opt out of it.
"""

from __future__ import annotations

import importlib.metadata
import os

from jqlora import host_malloc, xla_flags

# Distributions that give JAX an accelerator back end: with one installed (and no
# JAX_PLATFORMS saying otherwise) the host is not taken for a CPU host.
ACCELERATOR_PLUGINS = (
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "jax-rocm6-plugin",
    "jax-rocm7-plugin",
    "libtpu",
    "libtpu-nightly",
    "jax-metal",
)


def is_cpu_host() -> bool:
    """Whether JAX will run on the CPU here, judged without starting a back end:
    ``JAX_PLATFORMS`` names ``cpu`` first, or it is unset and no accelerator plugin is
    installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    for name in ACCELERATOR_PLUGINS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return False
    return True


def tune_cpu() -> dict[str, bool]:
    """Apply the CPU runtime settings; returns which took effect in this process.

    * ``xla_flags``: the opt-in XLA CPU flag (``JQLORA_XLA_FLAGS=1``);
    * ``host_malloc``: glibc keeps the memory it frees (one arena, no mmap, no trim), and
      JAX's CPU dispatch runs inline (opt out: ``JQLORA_HOST_MALLOC=system``).

    Both must precede JAX's back end; after it has started they change nothing (and say
    so, False). On a host whose JAX runs elsewhere than the CPU (`is_cpu_host`) it does
    nothing: there the heap settings would slow XLA's compiler and buy nothing.
    """
    if not is_cpu_host():
        return {"xla_flags": False, "host_malloc": False}
    return {"xla_flags": xla_flags.configure(), "host_malloc": host_malloc.configure()}
