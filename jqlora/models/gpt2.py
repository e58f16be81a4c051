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

from jqlora.models import cache as kv_cache
from jqlora.models.attention import attention
from jqlora.models.checkpoint_map import CheckpointMap
from jqlora.models.head import CausalLM
from jqlora.models.layer_list import LayerList
from jqlora.models.layers import Embed, LayerNorm, Linear, activation, head_scale

MODEL_TYPES = ("gpt2",)
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel"}
CHECKPOINT = CheckpointMap(
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

    @property
    def cache_layout(self) -> tuple[int, int, int]:
        return self.n_layer, self.n_head, self.head_dim


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
            k, v = cache_kv = kv_cache.write_cache(*cache_kv, k, v, cache_index)
        scale = head_scale(c.head_dim) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= self.layer + 1
        # Without a cache the mask is causal over this call's tokens (cache.attention_mask).
        out = attention(q, k, v, mask, scale, causal=cache_index is None)
        return Linear(c.n_embd, True, self.dtype, name="c_proj")(out), cache_kv


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = Linear(c.n_inner, True, self.dtype, name="c_fc")(x)
        return Linear(c.n_embd, True, self.dtype, name="c_proj")(
            activation(c.activation_function)(x)
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
        mask, valid = kv_cache.attention_mask(b, s, attention_mask, cache)
        if positions is None:
            positions = kv_cache.default_positions(b, s, cache)
        h = Embed(c.vocab_size, c.n_embd, self.dtype, name="wte")(ids)
        h = h + Embed(c.n_positions, c.n_embd, self.dtype, name="wpe")(positions)
        h, new_kv = LayerList(
            GPT2Block, c, c.n_layer, self.dtype, self.remat, self.scan_layers, name="h"
        )(h, cache, mask)
        h = LayerNorm(c.layer_norm_epsilon, True, self.dtype, name="ln_f")(h)
        return h, kv_cache.next_cache(cache, new_kv, valid, s)


class GPT2LMHeadModel(CausalLM):
    __doc__ = CausalLM.__doc__
    BACKBONE = GPT2Model
    BACKBONE_NAME = "transformer"
    TIED_EMBEDDING = ("transformer", "wte", "weight")
