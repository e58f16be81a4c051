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

# The suite is bound by XLA's compiler, which the heap settings that the `jqlora` command
# makes at its start (`jqlora.runtime.tune_cpu()`) slow by ~25 % (one malloc arena for the
# compiler's threads; jqlora/host_malloc.py): the commands the tests run keep glibc's
# defaults, and tests/test_host_malloc.py checks the settings themselves in fresh processes.
os.environ.setdefault("JQLORA_HOST_MALLOC", "system")

# The files that take minutes go first. xdist hands whole files to its two workers in
# collection order (pyproject.toml's addopts), so that no long file starts last and runs
# alone on one core while the other sits idle.
LONG_FILES = (
    "test_finetune_kill.py",
    "test_finetune.py",
    "test_finetune_faults.py",
    "test_sharding.py",
    "test_generate.py",
    "test_smollm2.py",
    "test_multiprocess.py",
    "test_host_malloc.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order
