"""Several adapters on one base: a batch whose row ``i`` runs adapter ``ids[i]``.

Adapters are separate trees, so switching adapters never touches the base. To serve a
mixed batch, the adapters are stacked into one tree whose leaves carry a leading
``[n_adapters]`` axis, and the model runs under ``jax.vmap`` over the rows with that row's
adapter gathered out of the stack. The base ``params`` are not mapped over, so every
base matmul is still one matmul over the whole batch (and a quantized weight is
dequantized once); only the small LoRA products become per-row.

Stacking makes the adapters uniform: ranks are zero-padded to the largest (zero rows of
``a`` / columns of ``b`` add nothing), a module one adapter lacks gets zeros, and each
adapter's scale is folded into its ``b`` (the stacked spec has scale 1). Dropout is off:
this is for serving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jqlora.lora.check import adapters as entries
from jqlora.lora.spec import LoraSpec


def stack_adapters(adapters: Sequence[Mapping]) -> dict:
    """Stacks ``n`` lora trees into one with leaves ``a: [n, R, in]``, ``b: [n, out, R]``.

    ``R`` is the largest rank among them; adapter ``k``'s entry is
    ``a_k`` zero-padded to ``[R, in]`` and ``scale_k * b_k`` zero-padded to ``[out, R]``, so
    ``x @ a.T @ b.T`` with scale 1 equals adapter ``k``'s own ``scale_k * x @ a_k.T @ b_k.T``.
    DoRA adapters cannot be stacked (their magnitude renormalizes the whole weight).
    """
    if not adapters:
        raise ValueError("stack_adapters: no adapters given")
    trees = [dict(entries(a)) for a in adapters]
    shapes: dict[tuple[str, ...], tuple[int, int, int]] = {}  # path -> (out, in, max r)
    for k, tree in enumerate(trees):
        for path, e in tree.items():
            if "magnitude" in e:
                raise ValueError(
                    f"stack_adapters: adapter {k} at {'.'.join(path)} is DoRA; DoRA cannot be stacked"
                )
            (r, in_f), (out_f, _) = e["a"].shape, e["b"].shape
            old = shapes.get(path, (out_f, in_f, 0))
            if old[:2] != (out_f, in_f):
                raise ValueError(
                    f"stack_adapters: adapter {k} at {'.'.join(path)} is [{out_f}, {in_f}], another is {list(old[:2])}"
                )
            shapes[path] = (out_f, in_f, max(old[2], r))
    stacked: dict = {}
    for path, (out_f, in_f, rank) in shapes.items():
        a_s, b_s = [], []
        for tree in trees:
            entry = tree.get(path)
            if entry is None:
                a_s.append(jnp.zeros((rank, in_f), jnp.float32))
                b_s.append(jnp.zeros((out_f, rank), jnp.float32))
                continue
            pad = rank - entry["a"].shape[0]
            a_s.append(jnp.pad(jnp.asarray(entry["a"], jnp.float32), ((0, pad), (0, 0))))
            b = jnp.asarray(entry["b"], jnp.float32) * entry["spec"].scale
            b_s.append(jnp.pad(b, ((0, 0), (0, pad))))
        node = stacked
        for part in path:
            node = node.setdefault(part, {})
        node.update(a=jnp.stack(a_s), b=jnp.stack(b_s), spec=LoraSpec(scale=1.0, dropout=0.0))
    return stacked


def select_adapters(stacked: Mapping, ids: jax.Array) -> dict:
    """The per-row tree: leaves ``[batch, ...]`` with row ``i`` = adapter ``ids[i]``."""
    return jax.tree.map(lambda x: x[ids], stacked)


def apply_per_row_adapters(fn: Callable, stacked: Mapping, ids: jax.Array, *batched):
    """``fn(lora, *batched)`` where row ``i`` of the batch sees adapter ``ids[i]``.

    ``fn`` takes a lora tree and pytrees whose array leaves lead with the batch axis
    (scalar leaves, such as a KV cache's fill index, are shared by all rows) and returns
    such pytrees, e.g. ``lambda lora, ids: model.apply({"params": params, "lora": lora},
    ids)``. Each row runs as a batch of one under ``jax.vmap``; ``params`` closed over
    by ``fn`` stay unbatched.
    """
    in_axes = [jax.tree.map(lambda x: None if jnp.ndim(x) == 0 else 0, b) for b in batched]
    is_axis = lambda x: x is None or isinstance(x, int)

    def rows_of(row_trees, take):
        """Each mapped leaf passed through ``take``; shared (scalar) leaves as they are."""
        return [
            jax.tree.map(lambda ax, x: x if ax is None else take(x), axes, tree, is_leaf=is_axis)
            for axes, tree in zip(in_axes, row_trees, strict=True)
        ]

    lora_rows = select_adapters(stacked, ids)
    # Which outputs are shared scalars (e.g. the cache index) and so are not mapped over.
    first = jax.tree.map(lambda x: x[0], lora_rows)
    out_shape = jax.eval_shape(lambda: fn(first, *rows_of(batched, lambda x: x[:1])))
    out_axes = jax.tree.map(lambda s: None if len(s.shape) == 0 else 0, out_shape)

    def one(lora_row, *row):
        out = fn(lora_row, *rows_of(row, lambda x: x[None]))
        return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else x[0], out)

    return jax.vmap(one, in_axes=(0, *in_axes), out_axes=out_axes)(lora_rows, *batched)
