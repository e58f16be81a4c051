"""The C heap settings made by ``jqlora.runtime.tune_cpu()`` (jqlora/host_malloc.py), which
the `jqlora` command calls at its start on a CPU host: a compiled
program's temporary buffer is no longer paged in anew at every run, the program's result
is the same, a program's temporary is free when its call returns (dispatch is inline), and
``JQLORA_HOST_MALLOC=system`` keeps glibc's and JAX's defaults."""

import ctypes
import ctypes.util
import json
import os

import pytest
from fresh_process import run_python

from jqlora import host_malloc

pytestmark = [
    pytest.mark.slow,  # fresh processes
    pytest.mark.skipif(host_malloc._glibc() is None, reason="the settings exist on glibc only"),
]

# A 64 MiB float32 temporary (the product) reduced to a scalar: the page faults of the
# second run, which allocates that buffer again, and the result.
_PROBE = """
import json, resource
import jax, jax.numpy as jnp
import jqlora
jqlora.runtime.tune_cpu()
x = jax.random.normal(jax.random.key(0), (4096, 4096))
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T)))
float(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
value = float(f(x))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
late = jqlora.host_malloc.configure()
print(json.dumps([faults, value, late, jax.config.read("jax_cpu_enable_async_dispatch")]))
"""

PAGES = 64 * 2**20 // 4096  # the temporary's 4 KiB pages
# The probes start from JAX's and glibc's defaults, whatever this process was given.
_UNSET = (host_malloc.OPT_OUT, host_malloc.ASYNC_DISPATCH.upper())


def _probe(**env) -> tuple[int, float, bool, bool]:
    out = run_python(_PROBE, unset=_UNSET, **env)
    faults, value, late, asynchronous = json.loads(out.splitlines()[-1])
    return faults, value, late, asynchronous


def test_second_run_reuses_the_buffer_and_opting_out_restores_the_page_faults():
    faults, value, late, asynchronous = _probe()
    system_faults, system_value, _, system_asynchronous = _probe(**{host_malloc.OPT_OUT: "system"})
    # glibc's defaults map the 64 MiB product afresh: one fault per page.
    assert system_faults >= PAGES * 0.9
    assert faults < PAGES * 0.1
    assert value == system_value
    # Opting out leaves JAX's dispatch alone too (the next test says why it is changed).
    assert (asynchronous, system_asynchronous) == (False, True)
    # Once the back end has started, configure() changes nothing and says so.
    assert late is False


# A QLoRA train step (state donated, as in a training loop) run 10 times on a small decoder:
# the heap's bytes in use right after reading each step's loss, less those in use after a
# pause in which a runtime thread could still free something.
_INLINE_PROBE = """
import ctypes, json, sys, time
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp
import jqlora
jqlora.runtime.tune_cpu()
from tiny_lm import TinyLM, init_params, make_lora, quantize_base
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
model = TinyLM(vocab=4096, hidden=128, intermediate=256, layers=1)
params = init_params(model, jax.random.key(0))
lora = make_lora(jax.random.key(1), params)
optimizer = jqlora.make_optimizer(1e-3)
state = jqlora.init_train_state(lora, optimizer)
step = jqlora.make_train_step(model, optimizer)
batch = {{"input_ids": jax.random.randint(jax.random.key(2), (4, 256), 0, 4096)}}
params = quantize_base(params)
compiled = step.lower(state, params, batch).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
state, metrics = compiled(state, params, batch)
float(metrics["loss"])
held_after_return = []
for _ in range(10):
    state, metrics = compiled(state, params, batch)
    float(metrics["loss"])
    at_return = libc.mallinfo2().uordblks
    time.sleep(0.1)
    held_after_return.append(at_return - libc.mallinfo2().uordblks)
asynchronous = jax.config.read("jax_cpu_enable_async_dispatch")
print(json.dumps([max(held_after_return) / temp, asynchronous]))
"""


def _inline_probe(**env) -> tuple[float, bool]:
    code = _INLINE_PROBE.format(tests=os.path.dirname(__file__))
    out = run_python(code, unset=_UNSET, **env)
    held, asynchronous = json.loads(out.splitlines()[-1])
    return held, asynchronous


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
    reason="glibc before 2.33 has no mallinfo2",
)
def test_a_train_step_frees_its_temporary_before_its_call_returns():
    # Dispatched asynchronously, a step's temporary buffer is freed by a runtime thread after
    # the loss is ready, so the next step could allocate its own first: two buffers in a heap
    # that never shrinks (jqlora/host_malloc.py). The settings run programs inline.
    held, asynchronous = _inline_probe()
    assert asynchronous is False
    assert held < 0.25
    # The environment's choice is left alone; with it, the whole temporary is still held
    # after the loss of some of the 10 steps, which is why the settings turn it off.
    # That is a race, lost in most processes but not all (one CI run saw none of the 10 steps
    # hold it): up to three processes, one must show it.
    helds = []
    for _ in range(3):
        held, asynchronous = _inline_probe(JAX_CPU_ENABLE_ASYNC_DISPATCH="true")
        assert asynchronous is True
        helds.append(held)
        if held > 0.5:
            break
    assert max(helds) > 0.5, helds
