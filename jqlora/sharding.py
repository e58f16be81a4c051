"""Placing QLoRA's trees on a device mesh: data parallel, FSDP and tensor parallel.

jqlora adds no distributed layer of its own: it names a ``jax.sharding.Mesh``, gives every
array a ``NamedSharding`` on it, and lets XLA (GSPMD) partition the jitted train step. The
same code runs on one CPU, a multi-GPU host, and a multi-host TPU slice or GPU cluster
(one process per host after ``jax.distributed.initialize()``).

Mesh axes (any subset, in any order; ``parse_mesh("data=2,fsdp=4")``):

* ``data``   -- the batch is split; weights are replicated;
* ``fsdp``   -- the batch is split *and* the weights are split (XLA gathers a weight where
  it is used), so each device stores ``1/fsdp`` of the base;
* ``tensor`` -- weights are split Megatron-style (column-parallel q/k/v/gate/up along
  ``out``, row-parallel o/down along ``in``); the batch is not split.

**Rules.** ``rules`` is a sequence of ``(regex, spec)``; the first regex that matches
(``re.search``) a leaf's ``/``-joined path and whose ``spec`` has one entry per dimension of
the leaf's *logical* (unquantized) shape decides its placement. A spec entry is ``None``, an
axis name, or a tuple of axis names. Axes missing from the mesh are dropped, so one rule
set serves every mesh.

**Quantized weights** are split on whole quantization blocks only. A ``QuantizedTensor``
for ``W: [out, in]`` stores ``codes: [out, in/2]`` (row-major, ``blocksize`` consecutive
elements per block) and a flat ``absmax: [out*in/blocksize]``. Splitting ``in`` over ``k``
devices needs ``in % (blocksize*k) == 0``; splitting ``out`` over ``k`` needs ``out % k == 0``
and ``(out/k)*in % blocksize == 0`` (each device's rows are whole blocks). When the rule's
split is illegal, its axes move to the other dimension; when neither works a ``ValueError``
names the layer. ``absmax`` (and, with double quantization, ``nested_absmax`` when its
256-blocks align) follows the ``out`` split: each device's rows are a contiguous run of the
flat block order. A flat ``absmax`` cannot follow an ``in`` split (a device's blocks are not
contiguous), so it is replicated along the ``in`` axes; it is 1/8 of the codes' size (1/32
double-quantized).

**Adapters and optimizer state** follow the base: ``a: [r, in]`` is split like ``W``'s
``in``, ``b: [out, r]`` and DoRA's ``magnitude: [out]`` like its ``out``. Every sub-tree of
the optimizer state with the adapters' structure (Adam's ``mu``, ``nu``, ...) gets the
adapters' shardings; the rest (step counts) is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.quant import QuantizedTensor

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # axes the batch is split over
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


# ----------------------------------------------------------------------------- meshes


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``. One size may be ``-1`` (the rest)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(
                f"--mesh {text!r}: expected name=size pairs with names from {AXES}, got {part!r}"
            )
        if name in axes:
            raise ValueError(f"--mesh {text!r}: axis {name!r} given twice")
        try:
            axes[name] = int(size)
        except ValueError:
            raise ValueError(
                f"--mesh {text!r}: size of {name!r} is not an integer: {size!r}"
            ) from None
        if axes[name] < 1 and axes[name] != -1:
            raise ValueError(
                f"--mesh {text!r}: size of {name!r} must be >= 1 or -1, got {axes[name]}"
            )
    if not axes:
        raise ValueError(f"--mesh {text!r}: no axes given")
    if list(axes.values()).count(-1) > 1:
        raise ValueError(f"--mesh {text!r}: at most one axis may be -1")
    return axes


def mesh_arg(text: str) -> dict[str, int]:
    """``parse_mesh`` as an ``argparse`` type (``add_argument("--mesh", type=mesh_arg)``),
    so that a bad value is reported with its reason."""
    import argparse

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def make_mesh(axes: Mapping[str, int] | str | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes).

    ``axes`` maps axis names to sizes (or is a ``parse_mesh`` string); default: all devices
    on ``data``. The sizes must multiply to the device count. Axes are GSPMD ("auto")
    axes: placement comes from the arrays' shardings, not from types.
    """
    devices = list(jax.devices() if devices is None else devices)
    if axes is None:
        axes = {"data": -1}
    if isinstance(axes, str):
        axes = parse_mesh(axes)
    axes = dict(axes)
    known = math.prod(s for s in axes.values() if s != -1)
    if -1 in axes.values():
        if len(devices) % known:
            raise ValueError(
                f"mesh {axes}: {len(devices)} devices do not divide into axes of product {known}"
            )
        axes = {k: (len(devices) // known if s == -1 else s) for k, s in axes.items()}
    if math.prod(axes.values()) != len(devices):
        raise ValueError(
            f"mesh {axes} needs {math.prod(axes.values())} devices, but there are {len(devices)}"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=auto, devices=devices)


# ----------------------------------------------------------------------------- rules


def _group(mesh: Mesh, entry) -> tuple[str, ...]:
    """A spec entry as a tuple of the mesh's axes of size > 1."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in names if mesh.shape.get(a, 1) > 1)


def _size(mesh: Mesh, group: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in group)


def _spec(groups: Iterable[tuple[str, ...]]) -> P:
    entries = [g if len(g) > 1 else g[0] if g else None for g in groups]
    while entries and entries[-1] is None:  # P("x", None) == P("x"): keep one spelling
        entries.pop()
    return P(*entries)


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


# ----------------------------------------------------------------------------- placing


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


def _batch_group(mesh: Mesh) -> tuple[str, ...]:
    # In mesh order, so that the rows follow the device order and each process (whose
    # devices are consecutive in it) holds one contiguous block of rows.
    return _group(mesh, tuple(a for a in mesh.axis_names if a in BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many parts the batch is split into on ``mesh`` (product of its batch axes)."""
    return _size(mesh, _batch_group(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dimension 0 split over the mesh's batch axes (``data`` and ``fsdp``)."""
    return NamedSharding(mesh, _spec([_batch_group(mesh)]))


def process_rows(global_rows: int, mesh: Mesh) -> slice:
    """The rows of a global batch that this process loads and passes to ``shard_batch``.

    With one process, all of them. The mesh's device order must give each process one
    contiguous block of rows (``make_mesh`` over ``jax.devices()`` does).
    """
    sharding = batch_sharding(mesh)
    index = sharding.devices_indices_map((global_rows,))
    rows = [index[device][0] for device in sharding.addressable_devices]
    bounds = sorted({(r.start or 0, global_rows if r.stop is None else r.stop) for r in rows})
    covered = sum(hi - lo for lo, hi in bounds)
    lo, hi = bounds[0][0], bounds[-1][1]
    if covered != hi - lo:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds non-contiguous batch rows {bounds}"
        )
    return slice(lo, hi)


def shard_batch(batch, mesh: Mesh):
    """A global batch from this process's rows: ``batch`` holds the
    ``1/process_count`` of the global batch that this process loaded (all of it in a
    single-process run); the rows are split over the mesh's batch axes."""
    sharding = batch_sharding(mesh)
    n = batch_shards(mesh)

    def one(path, x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        if rows % n:
            raise ValueError(
                f"batch[{_path_str(path)}]: global batch size {rows} does not divide over the {n} batch shards "
                f"of mesh {dict(mesh.shape)}"
            )
        return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(one, batch)


# ----------------------------------------------------------------------------- memory


MODEL_SPLIT = (
    "base weights",
    "LoRA parameters",
    "LoRA gradients",
    "optimizer state",
    "weight gradients",
    "f32 master weights",
)
BATCH_SPLIT = ("activations", "logits + loss")


def per_device(estimate, mesh_axes: Mapping[str, int] | str):
    """A ``jqlora.memory.MemoryEstimate`` (one device) as the figures of each device of a mesh.

    Per column, ``device[k] / (fsdp * tensor)`` for the weights, adapters, their gradients
    and the optimizer state (``MODEL_SPLIT``; also the host-offloaded optimizer state),
    ``device[k] / (data * fsdp)`` for activations and logits (``BATCH_SPLIT``; tensor
    parallelism splits most activations too, but not the residual stream, so it is not
    counted: an upper bound); anything else (the XLA back end's dequantize scratch) is
    kept whole. Not counted: XLA's transient gather of one layer's weights under FSDP.
    """
    axes = parse_mesh(mesh_axes) if isinstance(mesh_axes, str) else dict(mesh_axes)
    if any(v < 1 for v in axes.values()):
        raise ValueError(f"mesh {axes}: per-device figures need every axis size (no -1)")
    model = math.prod(axes.get(a, 1) for a in ("fsdp", "tensor"))
    batch = math.prod(axes.get(a, 1) for a in BATCH_AXES)

    def split(parts: dict) -> dict:
        return {
            k: -(-v // model) if k in MODEL_SPLIT else -(-v // batch) if k in BATCH_SPLIT else v
            for k, v in parts.items()
        }

    columns = tuple(
        dataclasses.replace(c, device=split(c.device), host=split(c.host)) for c in estimate.columns
    )
    return dataclasses.replace(estimate, columns=columns)
