"""Putting trees onto a mesh: any tree on given shardings, one base tensor as it loads,
a whole train state, or ``(params, lora, opt_state)`` at once."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jqlora.sharding.mesh import make_mesh
from jqlora.sharding.rules import (
    DEFAULT_RULES,
    _leaf_plan,
    _leaf_sharding,
    like_tree,
    lora_shardings,
    param_shardings,
)


def place(tree, shardings):
    """``tree`` on ``shardings``, each device receiving only its own slices.

    Works in a multi-process run too, where every process holds the same host value
    (loaded from the same checkpoint or initialised from the same seed): each process
    fills only its own devices' shards.
    """

    def one(x, s):
        if isinstance(x, jax.Array) and x.is_fully_addressable and s.is_fully_addressable:
            return jax.device_put(x, s)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(lambda v: v, out_shardings=s)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def placer(mesh: Mesh, rules=DEFAULT_RULES):
    """``place(name, leaf) -> leaf on its shards`` for one base tensor named by its dotted
    params path (``model.layers.0.mlp.down_proj.weight``): the hook a loader calls on each
    tensor as soon as it is read (``load_hf(..., place=placer(mesh))``), so the model is
    never whole on one device."""

    def place_leaf(name: str, leaf):
        path = name.replace(".", "/")
        return place(leaf, _leaf_sharding(leaf, _leaf_plan(path, leaf, mesh, rules), mesh))

    return place_leaf


def shard_train_state(state, params, mesh: Mesh, rules=DEFAULT_RULES):
    """``(state, params)`` on ``mesh`` for a ``TrainState(step, lora, opt_state)``: the
    adapters and every adapter-shaped part of the optimizer state as ``lora_shardings``,
    the rest (step counters) replicated, the base by ``param_shardings``."""
    l_sh = lora_shardings(state.lora, params, mesh, rules)
    state = place(state, like_tree(state, state.lora, l_sh, mesh))
    return state, place(params, param_shardings(params, mesh, rules))


def shard(params, lora, opt_state=None, mesh: Mesh | None = None, rules=DEFAULT_RULES):
    """``(params, lora, opt_state)`` placed on ``mesh`` (default: all devices, data parallel).

    Run the train step on the results as usual: ``jax.jit`` partitions it from the
    arrays' shardings. ``opt_state`` may be ``None``.
    """
    mesh = make_mesh() if mesh is None else mesh
    p_sh = param_shardings(params, mesh, rules)
    l_sh = lora_shardings(lora, params, mesh, rules)
    placed_lora = place(lora, l_sh)
    placed_opt = (
        None if opt_state is None else place(opt_state, like_tree(opt_state, lora, l_sh, mesh))
    )
    return place(params, p_sh), placed_lora, placed_opt
