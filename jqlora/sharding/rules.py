"""Placement rules: which ``NamedSharding`` each base leaf, adapter and optimizer-state
leaf gets on a mesh (see the ``jqlora.sharding`` package doc for the rules and the
whole-block constraints of quantized weights)."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.quant import QuantizedTensor
from jqlora.sharding.mesh import _group, _size, _spec

NESTED_BLOCKSIZE = 256  # double quantization: absmax values per nested block

_COLUMN = (
    r"(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|c_attn|c_fc|fc1|query_key_value"
    r"|dense_h_to_4h|w1|w3)"
)
_ROW = r"(o_proj|down_proj|c_proj|fc2|out_proj|dense_4h_to_h|w2|dense)"

DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    (rf"{_COLUMN}/weight$", (("tensor", "fsdp"), None)),
    (rf"{_ROW}/weight$", ("fsdp", "tensor")),
    (r"(embed_tokens|wte|lm_head|embed_out)/weight$", (("tensor", "fsdp"), None)),
    (r"/weight$", ("fsdp", None)),  # any other matrix: FSDP on its first dimension
)
"""Megatron-style tensor parallel plus FSDP for Llama/Mistral/Qwen/Gemma/Phi/GPT-2 names.
1-D leaves (norms, biases) match no rule and are replicated."""


def _logical_shape(x) -> tuple[int, ...]:
    return tuple(x.shape)


def _match(path: str, ndim: int, rules) -> tuple | None:
    for pattern, spec in rules:
        if spec is not None and len(spec) == ndim and re.search(pattern, path):
            return spec
    return None


def _fit_plain(shape, groups, mesh) -> list[tuple[str, ...]]:
    """Per dimension, the longest prefix of its axes whose product divides the dimension."""
    fitted = []
    for dim, group in zip(shape, groups, strict=True):
        keep: tuple[str, ...] = ()
        for a in group:
            if dim % (_size(mesh, keep) * mesh.shape[a]) == 0:
                keep += (a,)
        fitted.append(keep)
    return fitted


def _quantized_ok(qt: QuantizedTensor, out_g, in_g, mesh) -> bool:
    rows, cols = math.prod(qt.shape[:-1]), qt.shape[-1]
    n_out, n_in = _size(mesh, out_g), _size(mesh, in_g)
    if n_in > 1 and (qt.codes.ndim != 2 or cols % (qt.blocksize * n_in)):
        return False
    return rows % n_out == 0 and (rows // n_out * cols) % qt.blocksize == 0


def _fit_quantized(path: str, qt: QuantizedTensor, groups, mesh) -> list[tuple[str, ...]]:
    """``[out_axes, in_axes]`` for a quantized matrix: the rule's split, else all axes on
    one dimension, else an error (see the module doc for the block constraints)."""
    if qt.ndim < 2:
        return [()] * qt.ndim  # a quantized vector: never worth splitting
    out_g, in_g = tuple(groups[0]), tuple(groups[-1])
    for cand in ((out_g, in_g), (out_g + in_g, ()), ((), in_g + out_g)):
        if _quantized_ok(qt, *cand, mesh):
            return [cand[0]] + [()] * (qt.ndim - 2) + [cand[1]]
    axes = {a: mesh.shape[a] for a in out_g + in_g}
    raise ValueError(
        f"{path}: cannot split quantized weight of shape {qt.shape} (blocksize {qt.blocksize}) over mesh axes "
        f"{axes} on whole blocks: splitting 'in' over k devices needs in % (blocksize*k) == 0, splitting "
        f"'out' needs out % k == 0 and (out/k)*in % blocksize == 0. Use a mesh whose model axes divide it, "
        f"or a rule that replicates this layer."
    )


def _quantized_shardings(qt: QuantizedTensor, out_g, in_g, mesh):
    """A ``QuantizedTensor`` whose array fields are the ``NamedSharding`` of each array."""
    codes = _spec([out_g, in_g]) if qt.codes.ndim == 2 else _spec([out_g])
    nested_ok = out_g and qt.n_blocks % (NESTED_BLOCKSIZE * _size(mesh, out_g)) == 0
    by_field = {
        "codes": NamedSharding(mesh, codes),
        "absmax": NamedSharding(mesh, _spec([out_g])),
        "nested_absmax": NamedSharding(mesh, _spec([out_g if nested_ok else ()])),
        "offset": NamedSharding(mesh, P()),
    }
    # A pytree map, not dataclasses.replace: the leaves become shardings, not arrays, and
    # an absent (None) field stays absent.
    return jax.tree_util.tree_map_with_path(lambda path, _: by_field[path[0].name], qt)


def _is_qt(x) -> bool:
    return isinstance(x, QuantizedTensor)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_plan(name: str, x, mesh: Mesh, rules) -> list[tuple[str, ...]]:
    shape = _logical_shape(x)
    spec = _match(name, len(shape), rules)
    groups = [_group(mesh, e) for e in spec] if spec else [()] * len(shape)
    return _fit_quantized(name, x, groups, mesh) if _is_qt(x) else _fit_plain(shape, groups, mesh)


def _leaf_sharding(x, groups, mesh: Mesh):
    if _is_qt(x):
        return _quantized_shardings(
            x, groups[0] if groups else (), groups[-1] if groups else (), mesh
        )
    return NamedSharding(mesh, _spec(groups))


def plan(params, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, list[tuple[str, ...]]]:
    """``{"/"-joined path: [axes of dim 0, axes of dim 1, ...]}`` for every base leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qt)[0]
    return {_path_str(path): _leaf_plan(_path_str(path), x, mesh, rules) for path, x in leaves}


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES):
    """The base tree with each array replaced by its ``NamedSharding`` (a ``QuantizedTensor``
    leaf becomes a ``QuantizedTensor`` of shardings), ready for ``jax.device_put`` or
    ``jax.jit(..., in_shardings=...)``."""
    placed = plan(params, mesh, rules)

    def one(path, x):
        return _leaf_sharding(x, placed[_path_str(path)], mesh)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_qt)


def lora_shardings(lora, params, mesh: Mesh, rules=DEFAULT_RULES):
    """The adapter tree's shardings, matching the base weight at the same module path:
    ``a: [r, in]`` like the weight's ``in``, ``b: [out, r]`` and ``magnitude: [out]`` like
    its ``out``. An adapter whose module has no 2-D weight in ``params`` is replicated."""
    placed = plan(params, mesh, rules)

    def one(path, x):
        keys = [_path_str([k]) for k in path]
        module, leaf = "/".join(keys[:-1]), keys[-1]
        groups = placed.get(f"{module}/weight")
        if not groups or len(groups) != 2:
            return NamedSharding(mesh, P())
        out_g, in_g = groups
        spec = {"a": [(), in_g], "b": [out_g, ()], "magnitude": [out_g]}.get(leaf)
        if spec is None or len(spec) != x.ndim:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _spec(_fit_plain(x.shape, spec, mesh)))

    return jax.tree_util.tree_map_with_path(one, lora)


def like_tree(state, tree, shardings, mesh: Mesh):
    """Shardings for ``state`` (e.g. an optax state): each sub-tree with ``tree``'s structure
    and leaf shapes gets ``shardings``; every other leaf is replicated. A leaf already
    placed in host memory (offloaded optimizer state) keeps its memory kind."""
    treedef = jax.tree.structure(tree)
    shapes = [np.shape(x) for x in jax.tree.leaves(tree)]

    def like(x) -> bool:
        # jaxlib ships no stub for PyTreeDef, so mypy cannot see its attributes or ==.
        return treedef.num_leaves > 1 and jax.tree.structure(x) == treedef  # type: ignore[attr-defined, operator]

    def memory_kind(x):
        return getattr(getattr(x, "sharding", None), "memory_kind", None)

    def one(x):
        if like(x) and [np.shape(v) for v in jax.tree.leaves(x)] == shapes:
            return jax.tree.map(
                lambda v, s: NamedSharding(mesh, s.spec, memory_kind=memory_kind(v)), x, shardings
            )
        return NamedSharding(mesh, P(), memory_kind=memory_kind(x))

    return jax.tree.map(one, state, is_leaf=like)
