"""Shared test setup: quiet imports of the reference libraries."""

import logging
import os

# bitsandbytes logs a warning at import when an optional CPU kernel package is absent; it
# then uses its own CPU code, which is the reference the tests compare against.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The suite compares against float32 references: pin the compute dtype that
# `default_compute_dtype()` would otherwise pick from the CPU (bfloat16 where the CPU has
# AMX). Subprocesses inherit it. `tests/test_train_step.py` tests the automatic choice.
os.environ.setdefault("JQLORA_COMPUTE_DTYPE", "float32")

# The suite is bound by XLA's compiler, which the heap settings of `import jqlora` slow by
# ~25 % (one malloc arena for the compiler's threads; jqlora/host_malloc.py): the tests
# run with glibc's defaults, and tests/test_host_malloc.py checks the settings themselves
# in fresh processes.
os.environ.setdefault("JQLORA_HOST_MALLOC", "system")
