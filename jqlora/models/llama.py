"""The Llama family: Llama 2/3, Mistral, Qwen2, SmolLM2 (``model_type`` llama, mistral, qwen2).

    h = embed(ids)
    per layer:  h += o_proj(attn(rope(q_proj(rms(h))), rope(k_proj(.)), v_proj(.)))
                h += down_proj(act(gate_proj(rms(h))) * up_proj(rms(h)))
    logits = lm_head(rms(h))            (or embed.attend with tied embeddings)

Grouped-query attention (``num_key_value_heads``), RoPE with the ``rope_scaling`` variants
of ``jqlora.models.rope``, q/k/v biases (Qwen2, or ``attention_bias``), an optional sliding
window (Mistral). Parameter paths are the Hugging Face names:
``model/layers/{i}/self_attn/q_proj/weight`` etc. (see ``jqlora.models.common`` for the
``cache`` argument).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jqlora.models import common, rope
from jqlora.models.common import Embed, KVCache, Linear, RMSNorm

MODEL_TYPES = ("llama", "mistral", "qwen2")
CHECKPOINT = common.CheckpointMap(ignore=(r".*rotary_emb\.inv_freq",))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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
    rope: tuple  # sorted items of the rope parameters (hashable)
    sliding_windows: tuple  # per layer: window size or None
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        model_type = d.get("model_type", "llama")
        heads = d["num_attention_heads"]
        n_layers = d["num_hidden_layers"]
        qwen = model_type == "qwen2"
        window = d.get("sliding_window")
        if qwen:
            use = d.get("use_sliding_window", False)
            kinds = d.get("layer_types") or ["full_attention"] * n_layers
            windows = tuple(window if use and k == "sliding_attention" else None for k in kinds)
        else:
            windows = (window,) * n_layers
        rope_params = rope.rope_parameters(d)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qwen or bool(d.get("attention_bias", False)),
            o_bias=(not qwen) and bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=d.get("hidden_act", "silu"),
            rope=tuple(sorted((k, _freeze(v)) for k, v in rope_params.items())),
            sliding_windows=windows,
            hf=dict(d),
        )

    @property
    def rope_params(self) -> dict:
        return dict(self.rope)


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask, rope, cache_kv=None, cache_index=None):
        c = self.config
        b, s, _ = x.shape
        q = Linear(c.num_attention_heads * c.head_dim, c.qkv_bias, self.dtype, name="q_proj")(x)
        k = Linear(c.num_key_value_heads * c.head_dim, c.qkv_bias, self.dtype, name="k_proj")(x)
        v = Linear(c.num_key_value_heads * c.head_dim, c.qkv_bias, self.dtype, name="v_proj")(x)
        q = q.reshape(b, s, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, s, c.num_key_value_heads, c.head_dim)
        q = common.apply_rope(q, *rope)
        k = common.apply_rope(k, *rope)
        if cache_kv is not None:
            k, v = cache_kv = common.write_cache(*cache_kv, k, v, cache_index)
        # Without a cache the mask is causal over this call's tokens (common.attention_mask).
        causal = cache_index is None
        out = common.attention(q, k, v, mask, common.head_scale(c.head_dim), causal=causal)
        return Linear(c.hidden_size, c.o_bias, self.dtype, name="o_proj")(out), cache_kv


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        common.activation(c.hidden_act)  # an unknown name fails here, before any matmul
        gate = Linear(c.intermediate_size, c.mlp_bias, self.dtype, name="gate_proj")(x)
        up = Linear(c.intermediate_size, c.mlp_bias, self.dtype, name="up_proj")(x)
        hidden = common.gated_activation(c.hidden_act, gate, up)
        return Linear(c.hidden_size, c.mlp_bias, self.dtype, name="down_proj")(hidden)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    layer: int
    dtype: jnp.dtype

    @staticmethod
    def layers_alike(config: LlamaConfig) -> bool:
        """Whether every layer computes the same function of its params (``LayerList.scan``):
        not when some layers slide a window over the keys and others do not."""
        return len(set(config.sliding_windows)) == 1

    @nn.compact
    def __call__(self, h, cache_kv, cache_index, masks, rope):
        c = self.config
        mask = masks[c.sliding_windows[self.layer]]
        attn_in = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(h)
        attn_out, cache_kv = LlamaAttention(c, self.layer, self.dtype, name="self_attn")(
            attn_in, mask, rope, cache_kv, cache_index
        )
        h = h + attn_out
        mlp_in = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(h)
        return h + LlamaMLP(c, self.dtype, name="mlp")(mlp_in), cache_kv


class LlamaModel(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype
    remat: str | None = None
    scan_layers: bool = False

    @nn.compact
    def __call__(self, ids, attention_mask, positions, cache, segment_ids=None):
        c = self.config
        b, s = ids.shape
        if positions is None:
            positions = common.default_positions(b, s, cache)
        masks, valid = {}, None
        for window in set(c.sliding_windows):
            masks[window], valid = common.attention_mask(
                b, s, attention_mask, cache, window, segment_ids
            )
        rope_params = c.rope_params
        if rope_params["rope_type"] == "dynamic":
            inv_freq = rope.dynamic_inv_freq(
                rope_params, c.head_dim, c.max_position_embeddings, positions
            )
            scale = 1.0
        else:
            inv_freq, scale = rope.static_inv_freq(
                rope_params, c.head_dim, c.max_position_embeddings
            )
        # Once per call, shared by every layer (see common.rope_tables).
        rope_cos_sin = common.rope_tables(positions, jnp.asarray(inv_freq), scale)
        embed = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")
        layers = common.LayerList(
            LlamaDecoderLayer,
            c,
            c.num_hidden_layers,
            self.dtype,
            self.remat,
            self.scan_layers,
            name="layers",
        )
        h, new_kv = layers(embed(ids), cache, masks, rope_cos_sin)
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(h)
        return h, common.next_cache(cache, new_kv, valid, s)


class LlamaForCausalLM(common.CausalLMHead, nn.Module):
    """``apply({"params": p[, "lora": l]}, input_ids, attention_mask=None, positions=None,
    cache=None)`` -> logits ``[b, s, vocab]`` (and the new cache when one is given);
    ``hidden_only=True``: the final hidden states ``[b, s, hidden]`` instead (see
    ``common.CausalLMHead``); ``segment_ids``: packed examples (``common.attention_mask``)."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None  # a jax.checkpoint_policies name: rematerialize each decoder layer
    scan_layers: bool = False

    TIED_EMBEDDING = ("model", "embed_tokens", "weight")

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        cache=None,
        hidden_only=False,
        segment_ids=None,
    ):
        c = self.config
        h, new_cache = LlamaModel(c, self.dtype, self.remat, self.scan_layers, name="model")(
            input_ids, attention_mask, positions, cache, segment_ids
        )
        if hidden_only:
            return h
        logits = self.head_logits(h)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        return common.init_cache(
            c.num_hidden_layers,
            batch,
            max_len,
            c.num_key_value_heads,
            c.head_dim,
            dtype or self.dtype,
        )
