"""An XLA flag for JAX's CPU back end that ``jqlora.runtime.tune_cpu()`` (run by the
`jqlora` command at its start) adds when asked (``JQLORA_XLA_FLAGS=1``).

``--xla_cpu_experimental_ynn_fusion_type=+eltwise`` lets XLA hand chains of elementwise
operations (dtype converts, the gated activation, the softmax passes of the head loss) to
YNNPACK, the library XLA already uses for CPU matmuls, instead of its own loop fusions.
YNNPACK runs them on every core; XLA's loop fusions of this size mostly run on one. On a
2-core CPU it made the SmolLM2 QLoRA train step about 9 % faster (alternated runs, 14 % in
the best pair; benchmarks/RESULTS.md), although on one core it is slower: the gain is the
second core.

Numerics: inside such a fusion intermediate values stay in float32 between operations,
which XLA allows by default (``xla_allow_excess_precision``). Measured on SmolLM2 in
bfloat16, the logits and LoRA gradients came out closer to a float32 run than without the
flag (mean logit error 0.08 vs 0.18).

Why it is opt-in: the flag is experimental in XLA, and XLA failed to run one of jqlora's
programs with it (the test suite's data-parallel mesh run: "Instruction with unsupported
layout in YNN fusion"); it also grows XLA's temporary buffers (SmolLM2 step: 1.82 to 2.14
GB). A default must not crash a program that runs without it.

The flag is read when JAX starts its CPU back end (the first computation), so with
``JQLORA_XLA_FLAGS=1`` it is added to ``XLA_FLAGS`` by that call unless

* ``XLA_FLAGS`` already names ``xla_cpu_experimental_ynn_fusion_type`` (yours wins), or
* the back end has already started, in which case the process keeps what it has (child
  processes inherit the variable).

It changes nothing on a GPU or TPU, whose compilers do not read CPU flags.
"""

from __future__ import annotations

import os

#: The flag's name and the value jqlora sets.
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FUSION_FLAG}=+eltwise",)
#: Set to ``1`` to add `CPU_FLAGS`.
OPT_IN = "JQLORA_XLA_FLAGS"


def backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # a jax without this module: assume it has not started
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def cpu_flags(current: str, env_opt_in: str | None) -> str:
    """``current`` XLA_FLAGS with `CPU_FLAGS` appended, or unchanged (module doc's rules)."""
    if env_opt_in != "1" or YNN_FUSION_FLAG.lstrip("-") in current:
        return current
    return " ".join([*current.split(), *CPU_FLAGS])


def configure() -> bool:
    """Add `CPU_FLAGS` to ``XLA_FLAGS`` if asked (module doc). True when they take effect
    in this process: added now, before JAX's back end started."""
    current = os.environ.get("XLA_FLAGS", "")
    flags = cpu_flags(current, os.environ.get(OPT_IN))
    if flags == current:
        return False
    os.environ["XLA_FLAGS"] = flags
    return not backend_started()
