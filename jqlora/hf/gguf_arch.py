"""What llama.cpp needs to know about each model family: one ``GGUFFamily`` per ``model_type``.

A family gives llama.cpp's architecture name, whether the q/k rows are reordered for
llama.cpp's RoPE, and the hyperparameter keys it reads, each as a function of the
Hugging Face config. Tensor names come from the ``gguf`` package's own table
(``gguf.get_tensor_name_map``: ``model.layers.0.self_attn.q_proj.weight`` ->
``blk.0.attn_q.weight``), the one llama.cpp's converter uses. Adding a family is one entry
in ``FAMILIES``, with a ``hparams`` function if its keys differ from the Llama ones.

RoPE layouts: Hugging Face rotates the two halves of each head (``x_i`` with
``x_{i+d/2}``); llama.cpp's ``llama`` architecture rotates adjacent pairs (``x_{2i}``
with ``x_{2i+1}``), so q_proj and k_proj (weight and bias) are written with the rows of
each head reordered, HF row ``a * d/2 + b`` -> GGUF row ``2b + a`` (``permute_rows``;
``gguf_io.unpermute_rows`` is its inverse). Architectures llama.cpp runs with NeoX
(half-split) RoPE, such as ``qwen2``, store the rows as Hugging Face does.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import gguf
import numpy as np

from jqlora.models import rope as rope_lib


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's order: within each head HF row ``a * d/2 + b`` becomes row ``2b + a``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class Hparams:
    """A Hugging Face config with the defaults transformers fills in, in the names GGUF uses."""

    n_layers: int
    context_length: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    vocab: int
    rope: dict  # transformers 5's rope_parameters: rope_theta, rope_type, factor, ...
    sliding_window: int | None

    @classmethod
    def from_hf(cls, hf: dict) -> Hparams:
        heads = hf["num_attention_heads"]
        window = hf.get("sliding_window")
        if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
            window = None
        return cls(
            n_layers=hf["num_hidden_layers"],
            context_length=hf.get("max_position_embeddings", 2048),
            hidden=hf["hidden_size"],
            intermediate=hf["intermediate_size"],
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_eps=hf.get("rms_norm_eps", 1e-6),
            vocab=hf["vocab_size"],
            rope=rope_lib.rope_parameters(hf),
            sliding_window=window,
        )


# (key, value, GGUF value type); a key may hold "{arch}", filled in when written
KeyValue = tuple[str, object, "gguf.GGUFValueType"]
_U32, _F32, _STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING


def llama_hparams(h: Hparams) -> tuple[list[KeyValue], dict[str, np.ndarray]]:
    """The keys llama.cpp's ``llama``-like architectures read, and extra tensors (``rope_freqs``)."""
    llm, att, rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    keys: list[KeyValue] = [
        (llm.BLOCK_COUNT, h.n_layers, _U32),
        (llm.CONTEXT_LENGTH, h.context_length, _U32),
        (llm.EMBEDDING_LENGTH, h.hidden, _U32),
        (llm.FEED_FORWARD_LENGTH, h.intermediate, _U32),
        (att.HEAD_COUNT, h.heads, _U32),
        (att.HEAD_COUNT_KV, h.kv_heads, _U32),
        (att.LAYERNORM_RMS_EPS, h.rms_eps, _F32),
        (rope.FREQ_BASE, float(h.rope["rope_theta"]), _F32),
        (rope.DIMENSION_COUNT, h.head_dim, _U32),
        (llm.VOCAB_SIZE, h.vocab, _U32),
    ]
    if h.head_dim != h.hidden // h.heads:
        keys += [(att.KEY_LENGTH, h.head_dim, _U32), (att.VALUE_LENGTH, h.head_dim, _U32)]
    extra: dict[str, np.ndarray] = {}
    kind = h.rope["rope_type"]
    if kind in ("linear", "yarn"):
        keys += [(rope.SCALING_TYPE, kind, _STR)]
        keys += [(rope.SCALING_FACTOR, float(h.rope["factor"]), _F32)]
    if kind == "yarn":
        orig = h.rope["original_max_position_embeddings"]
        keys += [(rope.SCALING_ORIG_CTX_LEN, int(orig), _U32)]
        for hf_key, key in (
            ("attention_factor", rope.SCALING_YARN_ATTN_FACTOR),
            ("beta_fast", rope.SCALING_YARN_BETA_FAST),
            ("beta_slow", rope.SCALING_YARN_BETA_SLOW),
        ):
            if h.rope.get(hf_key) is not None:
                keys += [(key, float(h.rope[hf_key]), _F32)]
    elif kind == "llama3":
        # llama.cpp divides each RoPE frequency by the matching entry of this tensor.
        base, _ = rope_lib.static_inv_freq(dict(h.rope, rope_type="default"), h.head_dim, 0)
        scaled, _ = rope_lib.static_inv_freq(h.rope, h.head_dim, h.context_length)
        extra["rope_freqs.weight"] = (base / scaled).astype(np.float32)
    elif kind not in ("default", "linear"):
        raise ValueError(f"GGUF export: RoPE type {kind!r} has no llama.cpp equivalent")
    if h.sliding_window is not None:
        keys += [(att.SLIDING_WINDOW, int(h.sliding_window), _U32)]
        warnings.warn(
            f"GGUF export: the model attends within a sliding window of {h.sliding_window} "
            "tokens; llama.cpp's Llama and Qwen2 architectures ignore the window, so past "
            "that many tokens its outputs differ from the model's",
            UserWarning,
            stacklevel=3,
        )
    return keys, extra


@dataclasses.dataclass(frozen=True)
class GGUFFamily:
    """arch: llama.cpp's ``general.architecture``. permute_qk: write q/k rows in llama.cpp's
    interleaved-pair RoPE order. hparams: the ``{arch}.*`` keys and any extra tensors."""

    arch: str
    permute_qk: bool
    hparams: Callable[[Hparams], tuple[list[KeyValue], dict[str, np.ndarray]]] = llama_hparams


FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("llama", permute_qk=True),
    "mistral": GGUFFamily("llama", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": GGUFFamily("qwen2", permute_qk=False),
}


def family_for(hf_config: dict) -> GGUFFamily:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"GGUF export: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def gguf_tensor_name(family: GGUFFamily, hf_name: str, n_layers: int) -> str:
    """llama.cpp's name of a Hugging Face parameter (``gguf``'s table), or a ValueError."""
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == family.arch)
    name = gguf.get_tensor_name_map(arch, n_layers).get_name(hf_name, (".weight", ".bias"))
    if name is None:
        raise ValueError(f"GGUF export: no llama.cpp {family.arch} tensor for {hf_name!r}")
    return name
