"""The C heap settings made at ``import jqlora`` (jqlora/host_malloc.py): a compiled
program's temporary buffer is no longer paged in anew at every run, the program's result
is the same, and ``JQLORA_HOST_MALLOC=system`` keeps glibc's defaults."""

import json

import pytest
from fresh_process import run_python

from jqlora import host_malloc

pytestmark = pytest.mark.skipif(
    host_malloc._glibc() is None, reason="the settings exist on glibc only"
)

# A 64 MiB float32 temporary (the product) reduced to a scalar: the page faults of the
# second run, which allocates that buffer again, and the result.
_PROBE = """
import json, resource
import jax, jax.numpy as jnp
import jqlora
x = jax.random.normal(jax.random.key(0), (4096, 4096))
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T)))
float(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
value = float(f(x))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
late = jqlora.host_malloc.configure()
print(json.dumps([faults, value, late]))
"""

PAGES = 64 * 2**20 // 4096  # the temporary's 4 KiB pages


def _probe(**env) -> tuple[int, float, bool]:
    out = run_python(_PROBE, unset=(host_malloc.OPT_OUT,), **env)
    faults, value, late = json.loads(out.splitlines()[-1])
    return faults, value, late


def test_second_run_reuses_the_buffer_and_opting_out_restores_the_page_faults():
    faults, value, late = _probe()
    system_faults, system_value, _ = _probe(**{host_malloc.OPT_OUT: "system"})
    # glibc's defaults map the 64 MiB product afresh: one fault per page.
    assert system_faults >= PAGES * 0.9
    assert faults < PAGES * 0.1
    assert value == system_value
    # Once the back end has started, configure() changes nothing and says so.
    assert late is False
