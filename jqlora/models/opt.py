"""OPT (``model_type`` opt), e.g. facebook/opt-125m, the model of QLoRA's own examples.

    h = project_in(embed_tokens(ids)) + embed_positions(position + 2)
    per layer (pre-LN when do_layer_norm_before, else post-LN):
        h += out_proj(attn(q_proj(ln(h)) * d^-1/2, k_proj(.), v_proj(.)))
        h += fc2(act(fc1(ln(h))))
    logits = lm_head(project_out(final_layer_norm(h)))     (lm_head tied to embed_tokens)

Positions default to transformers' ``cumsum(attention_mask) - 1`` (so left padding does not
shift them); the learned table has 2 extra rows at the front. Params paths:
``model/decoder/layers/{i}/self_attn/q_proj/weight`` etc.
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
from jqlora.models.layers import Embed, LayerNorm, Linear, activation

MODEL_TYPES = ("opt",)
ARCHITECTURES = {"opt": "OPTForCausalLM"}
CHECKPOINT = CheckpointMap()
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool
    final_layer_norm: bool
    enable_bias: bool
    layer_norm_affine: bool
    activation_function: str
    tie_word_embeddings: bool
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf(cls, d: dict) -> OPTConfig:
        pre = bool(d.get("do_layer_norm_before", True))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            ffn_dim=d["ffn_dim"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            max_position_embeddings=d["max_position_embeddings"],
            word_embed_proj_dim=d.get("word_embed_proj_dim") or d["hidden_size"],
            do_layer_norm_before=pre,
            final_layer_norm=pre and not d.get("_remove_final_layer_norm", False),
            enable_bias=bool(d.get("enable_bias", True)),
            layer_norm_affine=bool(d.get("layer_norm_elementwise_affine", True)),
            activation_function=d.get("activation_function", "relu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            hf=dict(d),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def cache_layout(self) -> tuple[int, int, int]:
        return self.num_hidden_layers, self.num_attention_heads, self.head_dim


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cache_kv, cache_index, mask):
        c = self.config
        b, s, _ = x.shape
        proj = lambda n: Linear(c.hidden_size, c.enable_bias, self.dtype, name=n)  # noqa: E731
        # transformers scales q before the product (and not the scores); kept for equal rounding
        q = proj("q_proj")(x) * jnp.asarray(c.head_dim**-0.5, self.dtype)
        k, v = proj("k_proj")(x), proj("v_proj")(x)
        shape = (b, s, c.num_attention_heads, c.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if cache_kv is not None:
            k, v = cache_kv = kv_cache.write_cache(*cache_kv, k, v, cache_index)
        # Without a cache the mask is causal over this call's tokens (kv_cache.attention_mask).
        out = attention(q, k, v, mask, 1.0, causal=cache_index is None)
        return proj("out_proj")(out), cache_kv


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    layer: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, h, cache_kv, cache_index, mask):
        c = self.config
        pre = c.do_layer_norm_before
        attn_norm = LayerNorm(1e-5, c.layer_norm_affine, self.dtype, name="self_attn_layer_norm")
        ffn_norm = LayerNorm(1e-5, c.layer_norm_affine, self.dtype, name="final_layer_norm")
        attn, cache_kv = OPTAttention(c, self.dtype, name="self_attn")(
            attn_norm(h) if pre else h, cache_kv, cache_index, mask
        )
        h = h + attn
        if not pre:
            h = attn_norm(h)
        x = ffn_norm(h) if pre else h
        x = Linear(c.ffn_dim, c.enable_bias, self.dtype, name="fc1")(x)
        h = h + Linear(c.hidden_size, c.enable_bias, self.dtype, name="fc2")(
            activation(c.activation_function)(x)
        )
        if not pre:
            h = ffn_norm(h)
        return h, cache_kv


class OPTDecoder(nn.Module):
    config: OPTConfig
    dtype: jnp.dtype
    remat: str | None = None
    scan_layers: bool = False

    @nn.compact
    def __call__(self, ids, attention_mask, positions, cache):
        c = self.config
        b, s = ids.shape
        mask, valid = kv_cache.attention_mask(b, s, attention_mask, cache)
        if positions is None:
            positions = _default_positions(b, s, attention_mask, cache)
        embed = Embed(c.vocab_size, c.word_embed_proj_dim, self.dtype, name="embed_tokens")
        h = embed(ids)
        if c.word_embed_proj_dim != c.hidden_size:
            h = Linear(c.hidden_size, False, self.dtype, name="project_in")(h)
        table = Embed(
            c.max_position_embeddings + POSITION_OFFSET,
            c.hidden_size,
            self.dtype,
            name="embed_positions",
        )
        h = h + table(positions + POSITION_OFFSET)
        layers = LayerList(
            OPTDecoderLayer,
            c,
            c.num_hidden_layers,
            self.dtype,
            self.remat,
            self.scan_layers,
            name="layers",
        )
        h, new_kv = layers(h, cache, mask)
        if c.final_layer_norm:
            h = LayerNorm(1e-5, c.layer_norm_affine, self.dtype, name="final_layer_norm")(h)
        if c.word_embed_proj_dim != c.hidden_size:
            h = Linear(c.word_embed_proj_dim, False, self.dtype, name="project_out")(h)
        return h, kv_cache.next_cache(cache, new_kv, valid, s)


def _default_positions(b, s, attention_mask, cache):
    """transformers' OPT ``position_ids``: the number of real tokens before, minus one for
    padding (which reads row 1 of the table)."""
    new = (
        jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    )
    before = 0 if cache is None else jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
    return (jnp.cumsum(new, axis=1) + before) * new - 1


class OPTModel(nn.Module):
    config: OPTConfig
    dtype: jnp.dtype
    remat: str | None = None
    scan_layers: bool = False

    @nn.compact
    def __call__(self, ids, attention_mask, positions, cache):
        return OPTDecoder(self.config, self.dtype, self.remat, self.scan_layers, name="decoder")(
            ids, attention_mask, positions, cache
        )


class OPTForCausalLM(CausalLM):
    __doc__ = CausalLM.__doc__
    BACKBONE = OPTModel
    TIED_EMBEDDING = ("model", "decoder", "embed_tokens", "weight")
