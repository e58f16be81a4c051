"""The opt-in CPU XLA flag set by ``jqlora.runtime.tune_cpu()`` (jqlora/xla_flags.py): off by default,
added and in effect when asked, a user's own setting kept."""

import json

from fresh_process import run_python

from jqlora import xla_flags

FLAG = xla_flags.CPU_FLAGS[0]


def test_appended_to_existing_flags_when_asked():
    assert xla_flags.cpu_flags("", "1") == FLAG
    assert xla_flags.cpu_flags("--xla_force_host_platform_device_count=4", "1") == (
        f"--xla_force_host_platform_device_count=4 {FLAG}"
    )


def test_off_unless_asked_and_a_users_own_setting_wins():
    assert xla_flags.cpu_flags("--xla_dump_to=/tmp/x", None) == "--xla_dump_to=/tmp/x"
    assert xla_flags.cpu_flags("", "0") == ""
    mine = "--xla_cpu_experimental_ynn_fusion_type="
    assert xla_flags.cpu_flags(mine, "1") == mine


# A bfloat16 exp-multiply chain: YNNPACK takes it only with the flag.
_PROBE = """
import json, os, jax, jax.numpy as jnp, jqlora
jqlora.runtime.tune_cpu()
f = jax.jit(lambda x: (jnp.exp(x) * 2).astype(jnp.bfloat16))
hlo = f.lower(jnp.ones((64, 64))).compile().as_text()
print(json.dumps([os.environ.get("XLA_FLAGS", ""), "__ynn_fusion" in hlo]))
"""


def _run(code: str, **env) -> str:
    """stdout of ``code`` in a fresh CPU process without our flags' variables, plus ``env``."""
    return run_python(code, unset=("XLA_FLAGS", xla_flags.OPT_IN), **env)


def _probe(**env) -> tuple[str, bool]:
    flags, ynn = json.loads(_run(_PROBE, **env).splitlines()[-1])
    return flags, ynn


def test_asked_tune_cpu_puts_elementwise_fusions_on_ynnpack():
    flags, ynn = _probe(**{xla_flags.OPT_IN: "1"})
    assert flags == FLAG and ynn


def test_by_default_xla_keeps_its_defaults():
    flags, ynn = _probe()
    assert flags == "" and not ynn


def test_too_late_once_the_backend_started():
    # Started before the call: the process keeps its flags, configure says so.
    code = (
        "import jax.numpy as jnp; jnp.ones(1).block_until_ready(); import os;"
        "from jqlora import xla_flags; os.environ.pop('XLA_FLAGS', None);"
        "print(xla_flags.configure(), os.environ['XLA_FLAGS'])"
    )
    out = _run(code, **{xla_flags.OPT_IN: "1"}).split()
    assert out[-2:] == ["False", FLAG]  # set for child processes, not in effect here
