"""What each GGUF architecture means in Hugging Face terms: tensor names, the transformers
config, and how a stored tensor becomes the Hugging Face one.

One ``GGUFArch`` per llama.cpp architecture jqlora reads. The names follow llama.cpp's
``convert_hf_to_gguf`` (gguf's ``TENSOR_NAMES``) backwards; the config is built by the
transformers config class of the model type from the GGUF metadata, so every key the file
does not carry gets transformers' default, as in transformers' own GGUF loader. Where that
loader drops a key the file does carry (``attention.key_length`` of Qwen3, Gemma 2's
soft-caps, Phi-3's partial rotary factor, Gemma 3's linear RoPE scaling), it is read here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

# llama.cpp block tensor -> Hugging Face module, shared by the Llama-like families
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3: four norms per block; llama.cpp's "ffn_norm" is the pre-feed-forward one
_GEMMA_BLOCK = {
    **_LLAMA_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# GGUF metadata key (after "<arch>.") -> transformers config key, for every architecture
_COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_REQUIRED = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    """One llama.cpp architecture: its transformers model type and how its tensors map."""

    model_type: str
    block: dict
    extra_keys: dict = dataclasses.field(default_factory=dict)  # beyond _COMMON_KEYS
    permute_qk: bool = False  # llama.cpp interleaves q/k rows for its RoPE (llama only)
    norm_offset: float = 0.0  # Gemma stores its (1 + w) norms as 1 + w

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face parameter name of a GGUF tensor, or None if it has none."""
        if gguf_name in _GLOBAL:
            return _GLOBAL[gguf_name]
        m = _BLOCK.fullmatch(gguf_name)
        if m and m.group(2) in self.block:
            return f"model.layers.{m.group(1)}.{self.block[m.group(2)]}.{m.group(3)}"
        return None

    def to_hf(self, array: np.ndarray, gguf_name: str, config: dict) -> np.ndarray:
        """A dequantized GGUF tensor -> the Hugging Face tensor, computed in the dtype
        ``gguf.quants.dequantize`` returned, as transformers' tensor processors do."""
        if self.permute_qk and ".attn_q." in gguf_name:
            array = unpermute_rows(array, config["num_attention_heads"])
        elif self.permute_qk and ".attn_k." in gguf_name:
            array = unpermute_rows(array, config["num_key_value_heads"])
        if self.norm_offset and "norm.weight" in gguf_name:
            array = array - self.norm_offset
        return array


GGUF_ARCHITECTURES = {
    "llama": GGUFArch("llama", _LLAMA_BLOCK,
                      {"rope.dimension_count": "head_dim"}, permute_qk=True),
    "qwen2": GGUFArch("qwen2", _LLAMA_BLOCK),
    "qwen3": GGUFArch("qwen3", {**_LLAMA_BLOCK, **_QK_NORM},
                      {"attention.key_length": "head_dim"}),
    "gemma2": GGUFArch("gemma2", _GEMMA_BLOCK,
                       {"attention.key_length": "head_dim", "attention.sliding_window": "sliding_window",
                        "attn_logit_softcapping": "attn_logit_softcapping",
                        "final_logit_softcapping": "final_logit_softcapping"},
                       norm_offset=1.0),
    "gemma3": GGUFArch("gemma3_text", {**_GEMMA_BLOCK, **_QK_NORM},
                       {"attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"},
                       norm_offset=1.0),
    "phi3": GGUFArch("phi3", _PHI3_BLOCK),
}  # fmt: skip


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head GGUF row ``2b + a`` is HF row ``a * d/2 + b``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key, default=None):
    """The value of a GGUF metadata field, or ``default`` when the file lacks it."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture_of(reader, path: Path) -> tuple[str, GGUFArch]:
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return arch, GGUF_ARCHITECTURES[arch]


def gguf_config(reader, path: Path) -> dict:
    """The transformers config (as config.json holds it) that the GGUF metadata describes."""
    from transformers import AutoConfig

    name, arch = architecture_of(reader, path)
    missing = [k for k in _REQUIRED if field(reader, f"{name}.{k}") is None]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {name}.{missing[0]}")
    kwargs = {}
    for key, hf_key in {**_COMMON_KEYS, **arch.extra_keys}.items():
        value = field(reader, f"{name}.{key}")
        if value is not None:
            kwargs[hf_key] = float(np.float32(value)) if isinstance(value, float) else value
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    kwargs.setdefault("vocab_size", int(embed.shape[-1]))
    kwargs["tie_word_embeddings"] = "output.weight" not in names
    for hf_key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            kwargs[hf_key] = int(value)
    rotary = field(reader, f"{name}.rope.dimension_count")
    if name == "phi3" and rotary is not None:
        head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if rotary != head_dim:
            kwargs["partial_rotary_factor"] = rotary / head_dim
    scaling = field(reader, f"{name}.rope.scaling.type")
    if scaling == "linear":  # Gemma 3 4B+: on the global layers (transformers applies it so)
        factor = float(np.float32(field(reader, f"{name}.rope.scaling.factor", 1.0)))
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling not in (None, "none") or "rope_factors_long.weight" in names:
        raise ValueError(f"{path}: GGUF rope scaling {scaling or 'longrope'!r} is not supported")
    try:
        config = AutoConfig.for_model(arch.model_type, **kwargs).to_dict()
    except Exception as e:  # transformers' config validation raises several kinds
        raise ValueError(f"{path}: GGUF metadata is not a valid {name} config ({e})") from None
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"):
        config.pop(key, None)  # transformers' bookkeeping; save_hf names the class
    return config
