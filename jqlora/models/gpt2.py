"""GPT-2 (``model_type`` gpt2).

    h = wte(ids) + wpe(positions)
    per layer:  h += c_proj(attn(split(c_attn(ln_1(h)))))
                h += mlp.c_proj(gelu_new(mlp.c_fc(ln_2(h))))
    logits = lm_head(ln_f(h))                 (tied to wte)

Checkpoints store the Conv1D weights ``[in, out]``; jqlora keeps every linear weight
``[out, in]``, so they are transposed on load and save (as bitsandbytes does before it
quantizes them). ``c_attn`` stays fused: ``[3 * hidden, hidden]``, rows q, k, v.
Params paths: ``transformer/h/{i}/attn/c_attn/weight`` etc.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jqlora.models import common
from jqlora.models.common import Embed, KVCache, LayerNorm, Linear

MODEL_TYPES = ("gpt2",)
CHECKPOINT = common.CheckpointMap(
    ignore=(r".*\.attn\.bias", r".*\.attn\.masked_bias"),  # causal-mask buffers of old checkpoints
    transposed=(r".*\.(c_attn|c_proj|c_fc)\.weight",),
    prefix="transformer.",  # the original checkpoints name tensors "h.0.attn...", "wte.weight"
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_inner: int
    n_layer: int
    n_head: int
    n_positions: int
    layer_norm_epsilon: float
    activation_function: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    tie_word_embeddings: bool
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf(cls, d: dict) -> GPT2Config:
        return cls(
            vocab_size=d["vocab_size"],
            n_embd=d["n_embd"],
            n_inner=d.get("n_inner") or 4 * d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_positions=d["n_positions"],
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            activation_function=d.get("activation_function", "gelu_new"),
            scale_attn_weights=bool(d.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            hf=dict(d),
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class GPT2Block(nn.Module):
    config: GPT2Config
    layer: int
    dtype: jnp.dtype

    @staticmethod
    def layers_alike(config: GPT2Config) -> bool:
        """Whether every block computes the same function of its params (``LayerList.scan``)."""
        return not config.scale_attn_by_inverse_layer_idx

    @nn.compact
    def __call__(self, h, cache_kv, cache_index, mask):
        c = self.config
        b, s, _ = h.shape
        x = LayerNorm(c.layer_norm_epsilon, True, self.dtype, name="ln_1")(h)
        attn, cache_kv = GPT2Attention(c, self.layer, self.dtype, name="attn")(
            x, cache_kv, cache_index, mask
        )
        h = h + attn
        x = LayerNorm(c.layer_norm_epsilon, True, self.dtype, name="ln_2")(h)
        return h + GPT2MLP(c, self.dtype, name="mlp")(x), cache_kv


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cache_kv, cache_index, mask):
        c = self.config
        b, s, _ = x.shape
        qkv = Linear(3 * c.n_embd, True, self.dtype, name="c_attn")(x)
        shape = (b, s, c.n_head, c.head_dim)
        q, k, v = (t.reshape(shape) for t in jnp.split(qkv, 3, axis=-1))
        if cache_kv is not None:
            k, v = cache_kv = common.write_cache(*cache_kv, k, v, cache_index)
        scale = common.head_scale(c.head_dim) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= self.layer + 1
        # Without a cache the mask is causal over this call's tokens (common.attention_mask).
        out = common.attention(q, k, v, mask, scale, causal=cache_index is None)
        return Linear(c.n_embd, True, self.dtype, name="c_proj")(out), cache_kv


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = Linear(c.n_inner, True, self.dtype, name="c_fc")(x)
        return Linear(c.n_embd, True, self.dtype, name="c_proj")(
            common.activation(c.activation_function)(x)
        )


class GPT2Model(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype
    remat: str | None = None
    scan_layers: bool = False

    @nn.compact
    def __call__(self, ids, attention_mask, positions, cache):
        c = self.config
        b, s = ids.shape
        mask, valid = common.attention_mask(b, s, attention_mask, cache)
        if positions is None:
            positions = common.default_positions(b, s, cache)
        h = Embed(c.vocab_size, c.n_embd, self.dtype, name="wte")(ids)
        h = h + Embed(c.n_positions, c.n_embd, self.dtype, name="wpe")(positions)
        h, new_kv = common.LayerList(
            GPT2Block, c, c.n_layer, self.dtype, self.remat, self.scan_layers, name="h"
        )(h, cache, mask)
        h = LayerNorm(c.layer_norm_epsilon, True, self.dtype, name="ln_f")(h)
        return h, common.next_cache(cache, new_kv, valid, s)


class GPT2LMHeadModel(common.CausalLMHead, nn.Module):
    """``apply({"params": p[, "lora": l]}, input_ids, attention_mask=None, positions=None,
    cache=None)`` -> logits ``[b, s, vocab]`` (and the new cache when one is given);
    ``hidden_only=True``: the final hidden states ``[b, s, hidden]`` instead (see
    ``common.CausalLMHead``)."""

    config: GPT2Config
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None  # a jax.checkpoint_policies name: rematerialize each block
    scan_layers: bool = False

    TIED_EMBEDDING = ("transformer", "wte", "weight")

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache=None, hidden_only=False
    ):
        c = self.config
        h, new_cache = GPT2Model(c, self.dtype, self.remat, self.scan_layers, name="transformer")(
            input_ids, attention_mask, positions, cache
        )
        if hidden_only:
            return h
        logits = self.head_logits(h)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        return common.init_cache(
            c.n_layer, batch, max_len, c.n_head, c.head_dim, dtype or self.dtype
        )
