"""The C heap keeps the memory it frees, so XLA's per-step buffers are not paged in anew.

XLA's CPU runtime allocates each run of a compiled program's temporary buffer with
``malloc`` and frees it when the run ends: about 1.9 GB for a SmolLM2 QLoRA train step at
batch 4 x 256. glibc serves requests above 32 MiB with ``mmap`` and gives them back with
``munmap``, so at every step the kernel maps that buffer again and zeroes it page by page:
477,000 page faults per step measured on a 2-core CPU, 14-19 % of the step's wall time.

`configure` (called by ``jqlora.runtime.tune_cpu()``, which the `jqlora` command runs at its
start on a CPU host; never at import) asks glibc, through ``mallopt``, to

* serve every thread from the one main heap (``M_ARENA_MAX = 1``: a thread's own arena
  would still ``mmap`` what does not fit its 64 MiB heap),
* grow that heap instead of mapping large blocks (``M_MMAP_MAX = 0``), and
* never hand freed memory back to the kernel (``M_TRIM_THRESHOLD = -1``),

so from the second step on the buffer is memory the process already holds: no page
faults, and the same result.

It also turns off JAX's asynchronous dispatch on the CPU (``jax_cpu_enable_async_dispatch``
= False; computations on several devices are dispatched asynchronously either way). With
it on, a run's temporary buffer is freed by a runtime thread after the run's results are
ready, so the next step, dispatched as soon as Python has the loss, could request its buffer
before the last one was freed: the heap then grew by a second buffer that it never gives
back (SmolLM2, 2026-11-29: peak RSS 5.6-7.5 GiB instead of ~3.75 in 3 of 7 processes).
Run inline, a program frees its buffer before its call returns, so one step's buffer is free
when the next asks for it and the heap stays one buffer large (3.72-3.75 GiB in 6 of 6). A
training loop waits for each step's loss anyway; what it loses is Python running ahead of
the CPU, which eager code of many small operations may notice.
``JAX_CPU_ENABLE_ASYNC_DISPATCH`` in the environment is taken as the user's choice and left
alone.

What the settings cost:

* every thread takes the one heap's lock for its allocations, and XLA's compiler, which
  allocates much from several threads, compiles ~25 % slower (the tiny config's train
  step: 11-12 s against 9-10 s). A training run compiles a few programs and runs each for
  many steps; a session of many short compiles may be better off without it (the test
  suite opts out);
* memory freed after the process's peak stays with the process until it exits; and
* dispatch on the CPU is synchronous (above).

The settings must precede the threads that JAX's back end starts (a thread keeps the
arena it first allocated from; the back end reads the dispatch setting when it starts), so
after the back end has started `configure` changes nothing and says so. Set
``JQLORA_HOST_MALLOC=system`` to leave glibc's defaults and JAX's dispatch alone.
On a C library other than glibc (macOS, musl) there is nothing to set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: Set to ``system`` to keep the C library's own malloc settings.
OPT_OUT = "JQLORA_HOST_MALLOC"

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
#: JAX's option (and its environment variable) for asynchronous dispatch on the CPU.
ASYNC_DISPATCH = "jax_cpu_enable_async_dispatch"


def _glibc():
    """glibc's ``mallopt``, or None on another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # present in glibc only  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc.mallopt


def configure() -> bool:
    """Apply `SETTINGS` unless opted out (module doc). True when they take effect: set now,
    before JAX's back end started."""
    if os.environ.get(OPT_OUT, "").lower() == "system":
        return False
    mallopt = _glibc()
    if mallopt is None:
        return False
    from jqlora.xla_flags import backend_started

    if backend_started():
        return False
    dispatch_inline()
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)


def dispatch_inline() -> None:
    """Turn off JAX's asynchronous CPU dispatch (module doc), unless the environment
    already sets it or this jax has no such option."""
    if ASYNC_DISPATCH.upper() in os.environ:
        return
    import jax

    try:
        jax.config.update(ASYNC_DISPATCH, False)
    except (AttributeError, KeyError, ValueError):  # a jax without the option
        pass
