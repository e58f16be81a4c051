"""Each llama.cpp architecture in Hugging Face terms, for reading (``gguf_io``) and writing
(``gguf_export``) GGUF files: one ``GGUFArch`` per architecture.

Tensor names come from the ``gguf`` package's own table (``gguf.get_tensor_name_map``, the
one llama.cpp's ``convert_hf_to_gguf`` uses: ``model.layers.0.self_attn.q_proj.weight`` ->
``blk.0.attn_q.weight``), forwards when writing and inverted when reading; an architecture
lists only the Hugging Face modules of its blocks. Hyperparameters are one table of GGUF
key (after ``"<arch>."``) -> transformers config key, read into a config with transformers'
defaults for the keys a file lacks (as transformers' GGUF loader does) and written from the
config. Where that loader drops a key the file does carry (``attention.key_length`` of Qwen3,
Gemma 2's soft-caps, Phi-3's partial rotary factor, Gemma 3's linear RoPE scaling), it is
read here.

Stored tensors differ from Hugging Face's in two ways:

- RoPE layout: Hugging Face rotates the two halves of each head (``x_i`` with ``x_{i+d/2}``);
  llama.cpp's ``llama`` architecture rotates adjacent pairs (``x_{2i}`` with ``x_{2i+1}``),
  so q_proj and k_proj (weight and bias) are stored with the rows of each head reordered,
  HF row ``a * d/2 + b`` -> GGUF row ``2b + a`` (``permute_rows``, inverse
  ``unpermute_rows``). Architectures llama.cpp runs with NeoX (half-split) RoPE store the
  rows as Hugging Face does.
- Gemma's RMSNorms compute ``(1 + w) x``; llama.cpp stores ``1 + w`` (``norm_offset``).
"""

from __future__ import annotations

import dataclasses
import functools

import gguf
import numpy as np


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's order: within each head HF row ``a * d/2 + b`` becomes row ``2b + a``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of ``permute_rows``: GGUF row ``2b + a`` -> HF row ``a * d/2 + b``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GLOBAL = ("model.embed_tokens", "model.norm", "lm_head")
_LLAMA_BLOCK = (
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj",
)  # fmt: skip
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")
# Gemma 2/3: four norms per block (gguf's table maps them per architecture)
_GEMMA_BLOCK = (*_LLAMA_BLOCK, "pre_feedforward_layernorm", "post_feedforward_layernorm")
# Phi-3: fused q/k/v and gate/up matrices, stored fused by llama.cpp too
_PHI3_BLOCK = (
    "input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj", "post_attention_layernorm",
    "mlp.gate_up_proj", "mlp.down_proj",
)  # fmt: skip

# GGUF key (after "<arch>.") -> transformers config key, for every architecture
COMMON_KEYS = {
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
_GEMMA_KEYS = {"attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"}


@functools.cache
def _name_map(arch_name: str, n_layers: int) -> gguf.TensorNameMap:
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    return gguf.get_tensor_name_map(arch, n_layers)


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    """name: llama.cpp's ``general.architecture``. model_type: the transformers model type a
    file of it reads as. block: the Hugging Face modules of a block. keys: hyperparameters
    beyond ``COMMON_KEYS``. permute_qk: q/k rows in llama.cpp's interleaved-pair RoPE order.
    norm_offset: added to every norm weight when stored."""

    name: str
    model_type: str
    block: tuple[str, ...]
    keys: dict = dataclasses.field(default_factory=dict)
    permute_qk: bool = False
    norm_offset: float = 0.0

    def gguf_name(self, hf_name: str, n_layers: int) -> str | None:
        """llama.cpp's name of a Hugging Face parameter, or None if it has none."""
        return _name_map(self.name, n_layers).get_name(hf_name, (".weight", ".bias"))

    def hf_names(self, n_layers: int) -> dict[str, str]:
        """``{GGUF name: Hugging Face name}`` of every tensor a file of ``n_layers`` may hold."""
        modules = [*_GLOBAL]
        modules += [f"model.layers.{i}.{m}" for i in range(n_layers) for m in self.block]
        names = {}
        for module in modules:
            for suffix in (".weight", ".bias"):
                name = self.gguf_name(module + suffix, n_layers)
                if name is not None:
                    names[name] = module + suffix
        return names

    def _qk_heads(self, hf_name: str, config: dict) -> int | None:
        if self.permute_qk and ".q_proj." in hf_name:
            return config["num_attention_heads"]
        if self.permute_qk and ".k_proj." in hf_name:
            return config.get("num_key_value_heads") or config["num_attention_heads"]
        return None

    def to_hf(self, array: np.ndarray, hf_name: str, config: dict) -> np.ndarray:
        """A dequantized GGUF tensor -> the Hugging Face tensor, computed in the dtype
        ``gguf.quants.dequantize`` returned, as transformers' tensor processors do."""
        heads = self._qk_heads(hf_name, config)
        if heads is not None:
            array = unpermute_rows(array, heads)
        if self.norm_offset and "norm.weight" in hf_name:
            array = array - self.norm_offset
        return array

    def from_hf(self, array: np.ndarray, hf_name: str, config: dict) -> np.ndarray:
        """A Hugging Face tensor -> the tensor llama.cpp stores (the inverse of ``to_hf``)."""
        heads = self._qk_heads(hf_name, config)
        if heads is not None:
            array = permute_rows(array, heads)
        if self.norm_offset and "norm.weight" in hf_name:
            array = array + np.asarray(self.norm_offset, array.dtype)
        return array


GGUF_ARCHITECTURES = {  # llama.cpp architecture -> GGUFArch
    "llama": GGUFArch("llama", "llama", _LLAMA_BLOCK,
                      {"rope.dimension_count": "head_dim"}, permute_qk=True),
    "qwen2": GGUFArch("qwen2", "qwen2", _LLAMA_BLOCK),
    "qwen3": GGUFArch("qwen3", "qwen3", (*_LLAMA_BLOCK, *_QK_NORM),
                      {"attention.key_length": "head_dim"}),
    "gemma2": GGUFArch("gemma2", "gemma2", _GEMMA_BLOCK,
                       {**_GEMMA_KEYS, "attn_logit_softcapping": "attn_logit_softcapping",
                        "final_logit_softcapping": "final_logit_softcapping"},
                       norm_offset=1.0),
    "gemma3": GGUFArch("gemma3", "gemma3_text", (*_GEMMA_BLOCK, *_QK_NORM), _GEMMA_KEYS,
                       norm_offset=1.0),
    "phi3": GGUFArch("phi3", "phi3", _PHI3_BLOCK),
}  # fmt: skip
# Hugging Face model_type -> the architecture it is written as
EXPORT_ARCHITECTURES = {
    **{a.model_type: a for a in GGUF_ARCHITECTURES.values()},
    "mistral": GGUF_ARCHITECTURES["llama"],  # llama.cpp runs Mistral as llama
}


def arch_for_export(hf_config: dict) -> GGUFArch:
    """The architecture a model of this config is written as, or a ValueError."""
    model_type = hf_config.get("model_type")
    if model_type not in EXPORT_ARCHITECTURES:
        raise ValueError(
            f"GGUF export: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(EXPORT_ARCHITECTURES))}"
        )
    return EXPORT_ARCHITECTURES[model_type]
