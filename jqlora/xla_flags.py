"""The XLA flag jqlora adds for JAX's CPU back end, set at ``import jqlora``.

``--xla_cpu_experimental_ynn_fusion_type=+eltwise`` lets XLA hand chains of elementwise
operations (dtype converts, the gated activation, the softmax passes of the head loss) to
YNNPACK, the library XLA already uses for CPU matmuls, instead of its own loop fusions.
YNNPACK runs them on every core; XLA's loop fusions of this size mostly run on one. On a
2-core CPU it made the SmolLM2 QLoRA train step about 13-15 % faster (benchmarks/RESULTS.md),
although on one core it is slower: the gain is the second core.

Numerics: inside such a fusion intermediate values stay in float32 between operations,
which XLA allows by default (``xla_allow_excess_precision``). Measured on SmolLM2 in
bfloat16, the logits and LoRA gradients came out closer to a float32 run than without the
flag (mean logit error 0.08 vs 0.18).

The flag is read when JAX starts its CPU back end (the first computation), so it is added
to ``XLA_FLAGS`` at import unless

* ``XLA_FLAGS`` already names ``xla_cpu_experimental_ynn_fusion_type`` (yours wins), or
* ``JQLORA_XLA_FLAGS=0`` is set in the environment (opt out), or
* the back end has already started, in which case the process keeps what it has (child
  processes inherit the variable).

It changes nothing on a GPU or TPU, whose compilers do not read CPU flags.
"""

from __future__ import annotations

import os

#: The flag's name and the value jqlora sets.
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FUSION_FLAG}=+eltwise",)
#: Set to ``0`` to keep XLA's defaults.
OPT_OUT = "JQLORA_XLA_FLAGS"


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # a jax without this module: assume it has not started
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def cpu_flags(current: str, env_opt_out: str | None) -> str:
    """``current`` XLA_FLAGS with `CPU_FLAGS` appended, or unchanged (module doc's rules)."""
    if env_opt_out == "0" or YNN_FUSION_FLAG.lstrip("-") in current:
        return current
    return " ".join([*current.split(), *CPU_FLAGS])


def configure() -> bool:
    """Add `CPU_FLAGS` to ``XLA_FLAGS`` (module doc). True when they take effect in this
    process: added now, before JAX's back end started."""
    current = os.environ.get("XLA_FLAGS", "")
    flags = cpu_flags(current, os.environ.get(OPT_OUT))
    if flags == current:
        return False
    os.environ["XLA_FLAGS"] = flags
    return not _backend_started()
