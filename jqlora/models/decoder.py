"""The pre-norm RoPE decoder of Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3, one module set.

    h = embed(ids)                                  (Gemma: times sqrt(hidden), compute dtype)
    per layer:
        a  = attn(rms(h))       q, k, v = q_proj, k_proj, v_proj (Phi-3: one qkv_proj, split)
                                q, k = rms(q), rms(k) per head        (Qwen3, Gemma 3)
                                q, k = rope(q), rope(k)   on the first rotary_dim of each head
                                softmax(c tanh(s q.k / c))            (c: Gemma 2's soft-cap)
                                over the keys of the layer's window (sliding layers) or all
        h += a                  (Gemma: h += rms(a), "sandwich" norms)
        m  = down(act(gate(x)) * up(x)),  x = rms(h)   (Phi-3: one gate_up_proj, split)
        h += m                  (Gemma: h += rms(m))
    h = rms(h); the head (``jqlora.models.head``)

Gemma's norms are ``(1 + w) * normed`` (``DecoderConfig.norm_offset``). The families differ
only in their `DecoderConfig`, which ``from_hf`` of ``jqlora.models.llama``,
``.gemma`` and ``.phi3`` build from config.json; parameter paths are the Hugging Face names
(``model/layers/{i}/self_attn/q_proj/weight`` etc.).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jqlora.models import cache as kv_cache
from jqlora.models import rope
from jqlora.models.attention import attention
from jqlora.models.checkpoint_map import CheckpointMap
from jqlora.models.head import Backbone, CausalLM
from jqlora.models.layer_list import LayerList
from jqlora.models.layers import Embed, Linear, RMSNorm, activation, gated_activation

CHECKPOINT = CheckpointMap(ignore=(r".*rotary_emb\.inv_freq",))


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    ropes: tuple  # the distinct RoPE settings, each as sorted (key, value) items (hashable)
    layer_ropes: tuple  # per layer: its index into ropes
    sliding_windows: tuple  # per layer: window size or None
    rotary_dim: int  # dimensions of each head that RoPE rotates (head_dim unless partial)
    attn_scale: float  # multiplies q.k (head_dim^-1/2, Gemma: query_pre_attn_scalar^-1/2)
    norm_offset: float = 0.0  # Gemma: 1, norms are (1 + w) * normed
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    fused_projections: bool = False  # qkv_proj and gate_up_proj (Phi-3)
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def cache_layout(self) -> tuple[int, int, int]:
        return self.num_hidden_layers, self.num_key_value_heads, self.head_dim

    @property
    def windows(self) -> tuple:
        """The distinct sliding windows (None: full attention), in order of first use."""
        return tuple(dict.fromkeys(self.sliding_windows))


def sizes_from_hf(d: dict, head_dim: int, *, eps: float, max_positions: int, tied: bool) -> dict:
    """The `DecoderConfig` sizes every family reads alike from config.json; the arguments are
    the head size and the family's defaults for the keys a config may leave out."""
    heads = d["num_attention_heads"]
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=d.get("rms_norm_eps", eps),
        max_position_embeddings=d.get("max_position_embeddings", max_positions),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", tied)),
    )


def freeze_rope(params: dict) -> tuple:
    """RoPE settings as hashable sorted items (lists become tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


class DecoderAttention(nn.Module):
    config: DecoderConfig
    layer: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask, rope_cos_sin, cache_kv=None, cache_index=None):
        c = self.config
        b, s, _ = x.shape
        q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        if c.fused_projections:
            qkv = Linear(q_size + 2 * kv_size, c.qkv_bias, self.dtype, name="qkv_proj")(x)
            q, k, v = jnp.split(qkv, [q_size, q_size + kv_size], axis=-1)
        else:
            q = Linear(q_size, c.qkv_bias, self.dtype, name="q_proj")(x)
            k = Linear(kv_size, c.qkv_bias, self.dtype, name="k_proj")(x)
            v = Linear(kv_size, c.qkv_bias, self.dtype, name="v_proj")(x)
        q = q.reshape(b, s, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, s, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="k_norm")(k)
        q = rope.apply_rope(q, *rope_cos_sin)
        k = rope.apply_rope(k, *rope_cos_sin)
        if cache_kv is not None:
            k, v = cache_kv = kv_cache.write_cache(*cache_kv, k, v, cache_index)
        # Without a cache the mask is causal over this call's tokens (cache.attention_mask).
        out = attention(
            q,
            k,
            v,
            mask,
            c.attn_scale,
            causal=cache_index is None,
            softcap=c.attn_logit_softcapping,
        )
        return Linear(c.hidden_size, c.o_bias, self.dtype, name="o_proj")(out), cache_kv


class DecoderMLP(nn.Module):
    config: DecoderConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        activation(c.hidden_act)  # an unknown name fails here, before any matmul
        if c.fused_projections:
            gate_up = Linear(2 * c.intermediate_size, c.mlp_bias, self.dtype, name="gate_up_proj")
            gate, up = jnp.split(gate_up(x), 2, axis=-1)
        else:
            gate = Linear(c.intermediate_size, c.mlp_bias, self.dtype, name="gate_proj")(x)
            up = Linear(c.intermediate_size, c.mlp_bias, self.dtype, name="up_proj")(x)
        hidden = gated_activation(c.hidden_act, gate, up)
        return Linear(c.hidden_size, c.mlp_bias, self.dtype, name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    config: DecoderConfig
    layer: int
    dtype: jnp.dtype

    @staticmethod
    def layers_alike(config: DecoderConfig) -> bool:
        """Whether every layer computes the same function of its params (``LayerList.scan``):
        not when the layers differ in their window or RoPE settings."""
        return len(set(zip(config.sliding_windows, config.layer_ropes, strict=True))) == 1

    @nn.compact
    def __call__(self, h, cache_kv, cache_index, masks, rope_tables):
        c = self.config
        mask = masks[c.windows.index(c.sliding_windows[self.layer])]

        def norm(name):
            return RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name=name)

        attn_out, cache_kv = DecoderAttention(c, self.layer, self.dtype, name="self_attn")(
            norm("input_layernorm")(h), mask, rope_tables[c.layer_ropes[self.layer]], cache_kv,
            cache_index,
        )  # fmt: skip
        mlp = DecoderMLP(c, self.dtype, name="mlp")
        if c.sandwich_norms:
            h = h + norm("post_attention_layernorm")(attn_out)
            mlp_out = mlp(norm("pre_feedforward_layernorm")(h))
            return h + norm("post_feedforward_layernorm")(mlp_out), cache_kv
        h = h + attn_out
        return h + mlp(norm("post_attention_layernorm")(h)), cache_kv


class DecoderModel(Backbone):
    config: DecoderConfig

    @nn.compact
    def __call__(self, ids, attention_mask, positions, cache, segment_ids=None):
        c = self.config
        b, s = ids.shape
        if positions is None:
            positions = kv_cache.default_positions(b, s, cache)
        masks, valid = [], None
        for window in c.windows:
            mask, valid = kv_cache.attention_mask(b, s, attention_mask, cache, window, segment_ids)
            masks.append(mask)
        # Once per call, shared by every layer (see rope.rope_tables).
        tables = tuple(
            rope.rope_for(dict(p), c.rotary_dim, c.max_position_embeddings, positions)
            for p in c.ropes
        )
        h = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")(ids)
        if c.embed_scale:
            h = h * jnp.asarray(c.hidden_size**0.5, h.dtype)
        layers = LayerList(
            DecoderLayer,
            c,
            c.num_hidden_layers,
            self.dtype,
            self.remat,
            self.scan_layers,
            name="layers",
        )
        h, new_kv = layers(h, cache, tuple(masks), tables)
        h = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="norm")(h)
        return h, kv_cache.next_cache(cache, new_kv, valid, s)


class DecoderForCausalLM(CausalLM):
    __doc__ = CausalLM.__doc__
    BACKBONE = DecoderModel
    TIED_EMBEDDING = ("model", "embed_tokens", "weight")
