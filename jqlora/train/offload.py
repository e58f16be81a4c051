"""Optimizer state in host memory: ``offload(optimizer)``, JAX's answer to paged optimizers.

Adam keeps two float32 moments per trained parameter, 8 bytes of state against 4 bytes of
adapter. ``offload`` wraps any optax ``GradientTransformation`` so that its state lives in
the host memory kind (``"pinned_host"``) between steps:

* ``init`` places the fresh state in host memory;
* ``update``, traced inside the jitted train step, copies the state to device memory
  (``jax.device_put(x, jax.memory.Space.Device)``), runs the wrapped update there, and
  returns the new state placed back in host memory.

With the train step's ``state`` donated (``make_train_step`` donates it), XLA aliases the
host buffers of the old and new state, so no second copy of the state stays alive on
either side, and the device holds the moments only while the update runs. The arithmetic
is the wrapped optimizer's own: losses and parameters are bit-identical to the run without
offload. Used outside ``jit`` the update still works, copy by copy.

    optimizer = jqlora.offload(jqlora.make_optimizer(2e-4))
    state = jqlora.init_train_state(lora, optimizer)   # opt_state in pinned_host
    step = jqlora.make_train_step(model, optimizer)
"""

from __future__ import annotations

import jax
import optax

HOST = "pinned_host"  # what jax.memory.Space.Host means inside jit


# jax.memory is a SimpleNamespace, so mypy does not see its Space enum as a type.
def _move(x, space: jax.memory.Space, kind: str):  # type: ignore[name-defined]
    """``x`` moved to memory ``kind`` on the devices it already lives on.

    Inside ``jit`` (a tracer) by memory space, so sharding is left to the compiler; outside,
    by the array's own sharding with the memory kind swapped.
    """
    if isinstance(x, jax.core.Tracer):
        return jax.device_put(x, space)
    return jax.device_put(x, x.sharding.with_memory_kind(kind))


def to_host(tree):
    """Every array leaf of ``tree`` in pinned host memory."""
    return jax.tree.map(lambda x: _move(x, jax.memory.Space.Host, HOST), tree)


def to_device(tree):
    """Every array leaf of ``tree`` in device memory."""
    return jax.tree.map(lambda x: _move(x, jax.memory.Space.Device, "device"), tree)


def memory_kinds(tree) -> set[str]:
    """The memory kinds the arrays of ``tree`` live in (for checks and tests)."""
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def offload(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` with its state kept in pinned host memory between steps (see the module doc).

    Raises ValueError at ``init`` when the backend offers no pinned host memory.
    """

    def init_fn(params):
        state = optimizer.init(params)
        for x in jax.tree.leaves(state):
            for device in x.devices():
                kinds = [m.kind for m in device.addressable_memories()]
                if HOST not in kinds:
                    raise ValueError(
                        f"offload: device {device} has no {HOST!r} memory; it offers {kinds}"
                    )
        return to_host(state)

    def update_fn(updates, state, params=None):
        updates, state = optimizer.update(updates, to_device(state), params)
        return updates, to_host(state)

    return optax.GradientTransformation(init_fn, update_fn)
