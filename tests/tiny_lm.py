"""A small Llama-shaped decoder built from `jqlora.lora.Linear`, for train-step tests.

It honours the train-step model contract (``dtype``, ``remat``, ``scan_layers``) and its
parameter paths follow the Hugging Face Llama names, so ``llama_config(...)`` describes it
to the memory estimator. No rotary embedding: positions do not matter to these tests.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jqlora.lora.linear import Linear
from jqlora.lora.spec import LoraSpec
from jqlora.quant import quantize


class RMSNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * w.astype(jnp.float32)).astype(x.dtype)


class Attention(nn.Module):
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        b, t, _ = x.shape
        hd = self.hidden // self.heads
        q, k, v = (
            Linear(self.hidden, name=n)(x).reshape(b, t, self.heads, hd)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
        s = jnp.where(mask[:, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, self.hidden)
        return Linear(self.hidden, name="o_proj")(o)


class MLP(nn.Module):
    hidden: int
    intermediate: int

    @nn.compact
    def __call__(self, x):
        g = Linear(self.intermediate, name="gate_proj")(x)
        u = Linear(self.intermediate, name="up_proj")(x)
        return Linear(self.hidden, name="down_proj")(nn.silu(g) * u)


class Layer(nn.Module):
    hidden: int
    heads: int
    intermediate: int

    @nn.compact
    def __call__(self, x, mask):
        x = x + Attention(self.hidden, self.heads, name="self_attn")(
            RMSNorm(name="input_layernorm")(x), mask
        )
        return x + MLP(self.hidden, self.intermediate, name="mlp")(
            RMSNorm(name="post_attention_layernorm")(x)
        )


class ScanLayer(Layer):
    """``Layer`` with the (carry, x) -> (carry, y) signature ``nn.scan`` wants."""

    @nn.compact
    def __call__(self, x, mask):
        return Layer.__call__(self, x, mask), None


class TinyLM(nn.Module):
    vocab: int = 64
    hidden: int = 32
    heads: int = 4
    intermediate: int = 64
    layers: int = 2
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        emb = self.param("embed_tokens", nn.initializers.normal(1.0), (self.vocab, self.hidden))
        x = emb[input_ids].astype(self.dtype)
        keep = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        mask = jnp.tril(jnp.ones((t, t), bool))[None] & keep[:, None, :]
        cls = ScanLayer if self.scan_layers else Layer
        if self.remat:
            cls = nn.remat(cls, policy=getattr(jax.checkpoint_policies, self.remat))
        args = (self.hidden, self.heads, self.intermediate)
        if self.scan_layers:
            stack = nn.scan(
                cls,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.layers,
            )
            x, _ = stack(*args, name="layers")(x, mask)
        else:
            for i in range(self.layers):
                x = cls(*args, name=f"layers_{i}")(x, mask)
        x = RMSNorm(name="norm")(x)
        return Linear(self.vocab, name="lm_head")(x)


def llama_config(m: TinyLM) -> dict:
    """The Hugging Face config.json of a Llama model with ``m``'s shapes."""
    return {
        "model_type": "llama",
        "vocab_size": m.vocab,
        "hidden_size": m.hidden,
        "intermediate_size": m.intermediate,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.heads,
        "tie_word_embeddings": False,
    }


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear_weight(path) -> bool:
    names = [getattr(k, "key", None) for k in path]
    return names[-1] == "weight" and len(names) >= 2 and names[-2] in LINEAR_NAMES


def quantize_base(params, quant_type="nf4"):
    """Every decoder linear weight quantized (not the embedding, norms or lm_head)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: quantize(x, quant_type) if _is_linear_weight(p) else x, params
    )


def make_lora(key, params, r=4, alpha=8.0, init_b=0.0):
    """Adapters on every decoder linear layer: a ~ U(-1/sqrt(in), 1/sqrt(in)), b = init_b * N(0, 1)."""
    entries = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for i, (path, w) in enumerate(flat):
        if not _is_linear_weight(path):
            continue
        names = [k.key for k in path][:-1]
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        *lead, out, inp = w.shape
        a = jax.random.uniform(ka, (*lead, r, inp), minval=-1, maxval=1) / np.sqrt(inp)
        b = init_b * jax.random.normal(kb, (*lead, out, r))
        node = entries
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = {"a": a, "b": b, "spec": LoraSpec(alpha / r)}
    assert entries, "make_lora needs the float params (before quantize_base)"
    return entries


def init_params(model: TinyLM, key, t=8):
    return model.init(key, jnp.zeros((1, t), jnp.int32))["params"]
