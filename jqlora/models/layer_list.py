"""The decoder blocks as one list of layers, run unrolled or as one ``jax.lax.scan``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jqlora.models.cache import KVCache

__all__ = ["LayerList", "layer_variables", "scan_blocks", "stack_layer_variables"]


class LayerList(nn.Module):
    """The decoder blocks, named "0", "1", ... so their params sit at ``layers/{i}/...``.

    ``block(config, layer_index, dtype)`` is called as ``block(h, cache_kv, cache_index, *args)``
    and returns ``(h, cache_kv)``; the per-layer caches come back as a list (Nones without
    one). ``remat`` names a ``jax.checkpoint_policies`` policy: each block is rematerialized
    under it in the backward pass.

    Each block is applied to its own variables as a pure function, with dropout key
    ``fold_in(key, i)`` for layer ``i`` (``key``: this module's ``"dropout"`` rng). So
    ``scan``, which runs the blocks as one ``jax.lax.scan`` over their variables stacked
    inside the computation (`scan_blocks`: XLA compiles one block instead of ``n``), computes
    what the unrolled layers compute, dropout masks included; the params tree keeps its
    per-layer names either way. The loop is taken without a cache and when the layers are
    alike: the same variable structure and shapes (not: an adapter on some layers only), and
    a block class that does not declare them different (``layers_alike(config)`` false).
    """

    block: type
    config: object
    n: int
    dtype: jnp.dtype
    remat: str | None = None
    scan: bool = False

    @nn.compact
    def __call__(self, h, cache: KVCache | None, *args):
        if self.is_initializing():  # create the params, under their per-layer names
            for i in range(self.n):
                kv = None if cache is None else (cache.keys[i], cache.values[i])
                index = None if cache is None else cache.index
                h, _ = self.block(self.config, i, self.dtype, name=str(i))(h, kv, index, *args)
            return h, [None] * self.n
        key = self.make_rng("dropout") if self.has_rng("dropout") else None
        if self.scan and cache is None:
            stacked = stack_layer_variables(self.variables, self.n)
            alike = getattr(self.block, "layers_alike", lambda config: True)(self.config)
            if stacked is not None and alike:
                block = self.block(self.config, 0, self.dtype, parent=None)
                return scan_blocks(block, stacked, h, args, key, self.remat), [None] * self.n
        new_kv = []
        for i in range(self.n):
            block = self.block(self.config, i, self.dtype, parent=None)
            variables = layer_variables(self.variables, i)
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            index = None if cache is None else cache.index
            apply = _block_fn(block, args, key, self.remat)
            h, kv = apply(h, variables, jnp.int32(i), kv, index)
            new_kv.append(kv)
        return h, new_kv


def layer_variables(variables, i: int) -> dict:
    """Layer ``i``'s ``{collection: tree}`` out of the layer list's variables."""
    return {col: tree[str(i)] for col, tree in variables.items() if str(i) in tree}


def _block_fn(block: nn.Module, args, key, remat: str | None):
    """``(h, variables, i, cache_kv, cache_index) -> (h, cache_kv)``: ``block`` applied to one
    layer's variables with that layer's dropout key, under ``remat``."""

    def apply(h, variables, i, cache_kv=None, cache_index=None):
        rngs = {} if key is None else {"dropout": jax.random.fold_in(key, i)}
        return block.apply(variables, h, cache_kv, cache_index, *args, rngs=rngs)

    if remat:
        return jax.checkpoint(apply, policy=getattr(jax.checkpoint_policies, remat))
    return apply


def stack_layer_variables(variables, n: int):
    """``{collection: tree}`` with every leaf the stack ``[n, ...]`` of layers ``"0"..n-1``'
    leaves, or None when the layers' trees differ in structure, shape or dtype."""
    per_layer = [layer_variables(variables, i) for i in range(n)]
    signatures = [_signature(layer) for layer in per_layer]
    if any(s != signatures[0] for s in signatures):
        return None
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, x.dtype) for x in leaves)


def scan_blocks(block: nn.Module, stacked, h, args, key, remat: str | None):
    """``h`` through ``block`` once per layer of ``stacked`` (`stack_layer_variables`) as one
    ``jax.lax.scan``: one compiled body whatever the depth."""
    apply = _block_fn(block, args, key, remat)

    def body(h, layer):
        variables, i = layer
        return apply(h, variables, i)[0], None

    n = jax.tree.leaves(stacked)[0].shape[0]
    h, _ = jax.lax.scan(body, h, (stacked, jnp.arange(n, dtype=jnp.int32)))
    return h
