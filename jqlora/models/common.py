"""Pieces every architecture shares: embeddings, norms, RoPE, masked attention, the KV cache.

Parameter names follow PyTorch (``weight``, ``bias``) so a params path is the Hugging Face
parameter name split on dots.

KV cache
--------
A ``KVCache`` holds, for every layer, the keys and values of all slots written so far::

    keys[l], values[l]: [batch, max_len, n_kv_heads, head_dim]
    valid:              [batch, max_len] bool   slot holds a real (not padding) token
    index:              int32 scalar            slots filled so far (same for the batch)

A forward pass with ``cache=`` writes its ``s`` new tokens at slots ``index .. index+s-1``
and lets query slot ``i`` attend to every slot ``j <= i`` with ``valid[j]``; it returns
``(logits, new_cache)`` with ``index`` advanced by ``s``. Left padding works by passing the
prompt's ``attention_mask`` on the first call (padding slots stay invalid forever) and the
positions the model should see (``positions``); decoding steps then pass ``[b, 1]`` ids.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jqlora.lora.linear import Linear
from jqlora.models.attention import attention

__all__ = [
    "ACTIVATIONS",
    "CheckpointMap",
    "Embed",
    "KVCache",
    "LayerNorm",
    "LayerList",
    "Linear",
    "RMSNorm",
    "apply_rope",
    "rope_tables",
    "attention",
    "attention_mask",
    "init_cache",
    "write_cache",
]


# ----------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class CheckpointMap:
    """How a family's checkpoint names differ from its params names (the identity by default).

    ignore: regexes of checkpoint tensors that are buffers, not params (e.g. rotary inv_freq).
    transposed: regexes of params stored ``[in, out]`` in checkpoints (GPT-2's Conv1D).
    prefix: prepended to checkpoint names that lack it (old GPT-2 files have ``h.0...``).
    """

    ignore: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()
    prefix: str = ""

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignore)

    def is_transposed(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.transposed)

    def param_name(self, name: str, expected) -> str:
        if name not in expected and self.prefix and not name.startswith(self.prefix):
            return self.prefix + name
        return name


# ----------------------------------------------------------------------------- layers


class Embed(nn.Module):
    """Token or position embedding table ``weight: [num, features]``; never quantized."""

    num: int
    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.normal(0.02), (self.num, self.features))
        return jnp.take(weight, ids, axis=0).astype(self.dtype or weight.dtype)


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the normalisation in float32 (as transformers)."""

    eps: float = 1e-6
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(dtype) * normed.astype(dtype)


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` in float32; no params when not affine."""

    eps: float = 1e-5
    affine: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.param("weight", nn.initializers.ones, (x.shape[-1],)).astype(jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],)).astype(jnp.float32)
        return y.astype(dtype)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_activation(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """``act(gate) * up`` (a gated MLP's hidden state) in float32, rounded once to gate's dtype.

    bfloat16 arithmetic on a CPU rounds after every operation; here the whole expression runs
    in float32. The backward pass keeps ``gate`` and ``up`` in their own dtype and recomputes
    the float32 values, where autodiff would keep both in float32 (twice the memory).
    """
    return (ACTIVATIONS[name](gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _gated_fwd(name, gate, up):
    return gated_activation(name, gate, up), (gate, up)


def _gated_bwd(name, residuals, d_out):
    gate, up = residuals
    act, act_vjp = jax.vjp(ACTIVATIONS[name], gate.astype(jnp.float32))
    d_out = d_out.astype(jnp.float32)
    (d_gate,) = act_vjp(d_out * up.astype(jnp.float32))
    return d_gate.astype(gate.dtype), (d_out * act).astype(up.dtype)


gated_activation.defvjp(_gated_fwd, _gated_bwd)


# ----------------------------------------------------------------------------- RoPE


def rope_tables(
    positions: jax.Array, inv_freq: jax.Array, attention_scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """``(cos, signed_sin)`` of the rotary angles, ``[b, s, 1, d]`` float32, for `apply_rope`.

    ``positions: [b, s]``, ``inv_freq: [d/2]`` (float32). With ``a = pos * inv_freq``:
    ``cos = [cos a, cos a]`` and ``signed_sin = [-sin a, sin a]``, both times
    ``attention_scale`` (YaRN). A model computes them once per call and hands them to every
    layer: computed inside each layer's rotation, XLA evaluated cos and sin once per element
    of every head, in a loop its CPU back end does not vectorize (an eighth of a SmolLM2
    layer's forward and backward time on a CPU).
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles) * attention_scale
    sin = jnp.sin(angles) * attention_scale
    return (
        jnp.concatenate([cos, cos], axis=-1)[:, :, None, :],
        jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :],
    )


def apply_rope(x: jax.Array, cos: jax.Array, signed_sin: jax.Array) -> jax.Array:
    """Rotary embedding, transformers' "rotate half" convention: ``x * cos +
    rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``.

    ``x: [b, s, h, d]``; ``cos, signed_sin: [b, s, 1, d]`` from `rope_tables`. Computed as
    ``x * cos + [x2, x1] * signed_sin`` (the same products): the halves swapped without a
    negation fuse into the head-major transpose that follows ~3x faster on a CPU.
    """
    # In float32 and rounded once: bfloat16 arithmetic on a CPU rounds after every operation.
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    swapped = jnp.concatenate([x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + swapped * signed_sin).astype(x.dtype)


# ----------------------------------------------------------------------------- attention


class KVCache(NamedTuple):
    """Keys/values of every layer for generation; see the module docstring."""

    keys: tuple
    values: tuple
    valid: jax.Array
    # Shadows tuple.index on purpose (the write position); typeshed's tuple declares a method.
    index: jax.Array  # type: ignore[assignment]


def init_cache(
    n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32
) -> KVCache:
    """An empty cache of ``max_len`` slots."""
    shape = (batch, max_len, n_kv_heads, head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(n_layers))
    return KVCache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def attention_mask(
    batch: int,
    seq: int,
    padding_mask: jax.Array | None,
    cache: KVCache | None,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(mask [b, s, t], valid [b, t])``: query ``i`` may see key ``j`` iff ``j <= i``, key ``j``
    is valid (not padding), with a window ``w``, ``j > i - w``, and with ``segment_ids``
    (``[b, s]``, packed examples: ``jqlora.train.packing``), both lie in one segment: a
    block-diagonal causal mask, so no example attends to another.

    Without a cache the keys are this call's ``s`` tokens; with one they are the cache's
    ``max_len`` slots after this call's tokens are written at ``cache.index``.
    """
    new_valid = jnp.ones((batch, seq), bool) if padding_mask is None else padding_mask.astype(bool)
    if cache is None:
        start: int | jax.Array = 0
        valid = new_valid
    else:
        start = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, start))
    q_slot = start + jnp.arange(seq)[:, None]
    k_slot = jnp.arange(valid.shape[1])[None, :]
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed = allowed & (k_slot > q_slot - sliding_window)
    mask = allowed[None] & valid[:, None, :]
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("segment_ids (packed examples) are for training, without a cache")
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask, valid


def write_cache(
    cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, index
) -> tuple[jax.Array, jax.Array]:
    """The layer's cache with ``k, v: [b, s, kv, d]`` written at slot ``index``."""
    k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
    return k, v


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


def tied_logits(h: jax.Array, embedding: jax.Array) -> jax.Array:
    """``h @ embedding.T``: the output head of a model whose lm_head is its input embedding."""
    return jnp.einsum(
        "...d,vd->...v", h, embedding.astype(h.dtype), preferred_element_type=jnp.float32
    ).astype(h.dtype)


class CausalLMHead:
    """The output head every ``*ForCausalLM`` shares (a mixin; needs ``config`` and ``dtype``).

    The head is the input embedding at ``TIED_EMBEDDING`` (a params path) when the config
    ties them, else a ``Linear`` named ``lm_head``. ``__call__(..., hidden_only=True)``
    returns the hidden states the head would read, so that a loss can apply the head itself
    (``jqlora.train.head_loss``) with the weight at ``head_weight_path()``.
    """

    TIED_EMBEDDING: tuple[str, ...] = ()

    def head_weight_path(self) -> tuple[str, ...]:
        """The params path of the head's ``[vocab, hidden]`` weight."""
        tied = self.config.tie_word_embeddings  # type: ignore[attr-defined]
        return self.TIED_EMBEDDING if tied else ("lm_head", "weight")

    def head_logits(self, h: jax.Array) -> jax.Array:
        """``[..., vocab]`` logits of hidden states ``h``; call inside the compact ``__call__``."""
        c = self.config  # type: ignore[attr-defined]
        if c.tie_word_embeddings:
            weight = self.variables["params"]  # type: ignore[attr-defined]
            for key in self.TIED_EMBEDDING:
                weight = weight[key]
            return tied_logits(h, weight)
        return Linear(c.vocab_size, False, self.dtype, name="lm_head")(h)  # type: ignore[attr-defined]


def next_cache(cache: KVCache | None, new_kv: list, valid: jax.Array, seq: int) -> KVCache | None:
    """The cache after a forward pass of ``seq`` tokens (None without a cache)."""
    if cache is None:
        return None
    return KVCache(
        tuple(k for k, _ in new_kv), tuple(v for _, v in new_kv), valid, cache.index + seq
    )


def default_positions(batch: int, seq: int, cache: KVCache | None) -> jax.Array:
    """``index + arange(seq)`` for every row: transformers' default ``position_ids``."""
    start = 0 if cache is None else cache.index
    return jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))


def head_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
