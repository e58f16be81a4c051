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

from jqlora.sharding.batch import batch_sharding, batch_shards, process_rows, shard_batch
from jqlora.sharding.memory import BATCH_SPLIT, MODEL_SPLIT, per_device
from jqlora.sharding.mesh import AXES, BATCH_AXES, make_mesh, mesh_arg, parse_mesh
from jqlora.sharding.place import place, placer, shard, shard_train_state
from jqlora.sharding.rules import (
    DEFAULT_RULES,
    NESTED_BLOCKSIZE,
    like_tree,
    lora_shardings,
    param_shardings,
    plan,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "BATCH_SPLIT",
    "DEFAULT_RULES",
    "MODEL_SPLIT",
    "NESTED_BLOCKSIZE",
    "batch_sharding",
    "batch_shards",
    "like_tree",
    "lora_shardings",
    "make_mesh",
    "mesh_arg",
    "param_shardings",
    "parse_mesh",
    "per_device",
    "place",
    "placer",
    "plan",
    "process_rows",
    "shard",
    "shard_batch",
    "shard_train_state",
]
