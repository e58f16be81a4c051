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
