"""Shared test setup: quiet reference libraries, the test tiers, a compilation cache shared
by the run's processes, and the real model's transformers reference loaded once."""

import logging
import os
import shutil
import tempfile

import pytest

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

# XLA's persistent compilation cache, shared by every process of one test run (xdist workers
# and the `jqlora` subprocesses the tests start inherit the variable): a program compiled
# once is read back elsewhere. Set here for the tests only, never by the library; the
# directory lives as long as the run (pytest_unconfigure of the process that made it).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jqlora-test-xla-cache-")
    os.environ["JQLORA_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


def pytest_unconfigure(config):
    if os.environ.get("JQLORA_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def _jax_sees_a_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


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


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order

    # The third tier: GPU tests run only where JAX sees a GPU (whatever -m says).
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not _jax_sees_a_gpu():
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct in transformers (float32) and in jqlora, with its tokenizer:
    ``(tokenizer, reference, model, params)``. transformers' GGUF load takes ~17 s, so
    the real-model tests share one per test process."""
    import torch
    import transformers as tf

    import jqlora
    from jqlora.hf.smollm2 import smollm2_gguf_path

    path = smollm2_gguf_path(fetch=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reference = tf.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    model, params = jqlora.load_hf(path)
    return tokenizer, reference, model, params
