"""Llama-architecture GGUF files (llama.cpp's format) -> ``(model, params)``.

The metadata becomes a transformers-style Llama config; each tensor is dequantized to
float32 with ``gguf.quants.dequantize`` (bit for bit what transformers' GGUF loader does)
and then treated like a safetensors tensor (cast, maybe quantized to NF4/FP4).

llama.cpp stores q_proj and k_proj with the rows of each head interleaved for its RoPE
(``convert_hf_to_gguf`` reshapes ``[heads, 2, d/2, in]`` -> ``[heads, d/2, 2, in]``); the
inverse permutation restores the Hugging Face order, in which jqlora's rotate-half RoPE
applies.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np

from jqlora.hf import names as names_lib
from jqlora.hf.convert import convert_tensor, progress_bar, release_freed_memory
from jqlora.models import model_for_config

_LAYER_NAMES = {
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
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a llama GGUF tensor, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head GGUF row ``2b + a`` is HF row ``a * d/2 + b``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader, path: Path) -> dict:
    """A transformers Llama config.json dict from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' GGUF files load"
        )
    names = {t.name for t in reader.tensors}

    def need(key):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(_field(reader, "llama.vocab_size", int(embed.shape[-1]))),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(np.float32(need("attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    for key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = _field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[key] = int(value)
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
    return config


GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    """A ValueError naming ``path`` unless it is a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such GGUF file")
    if not path.is_file():
        raise ValueError(f"{path}: a directory, not a GGUF file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        found = "the file is empty" if not head else f"it starts with {head!r}"
        raise ValueError(f"{path}: not a GGUF file (no {GGUF_MAGIC!r} magic: {found})")


def load_gguf(path: Path, quantization, dtype, compute_dtype, progress=None):
    """``(model, params)`` from a llama GGUF file (see the module doc)."""
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    check_gguf_file(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from None
    config = gguf_config(reader, path)
    model = model_for_config(config, compute_dtype, source=str(path))
    expected = names_lib.expected_params(model)
    flat = {}
    with progress_bar(len(reader.tensors), f"loading {path.name}", progress) as bar:
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
            if name is None or name not in expected.shapes:
                raise ValueError(f"{path}: unexpected tensor {tensor.name!r} for a llama model")
            w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            if name.endswith("q_proj.weight"):
                w = unpermute_rows(w, config["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                w = unpermute_rows(w, config["num_key_value_heads"])
            flat[name] = convert_tensor(
                w, name, expected, quantization, dtype, source=f"{path}: tensor {tensor.name!r}"
            )
            jax.block_until_ready(flat[name])
            del w
            release_freed_memory()
            bar.update()
    missing = sorted(set(expected.shapes) - set(flat))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]} ({len(missing)} in all)")
    return model, names_lib.unflatten(flat)
