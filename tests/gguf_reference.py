"""Tiny GGUF files written with ``gguf.GGUFWriter`` from tiny random transformers models,
and transformers' own GGUF loader as the reference that reads them back.

Tensor names come from gguf's own Hugging Face -> GGUF table (``get_tensor_name_map``, what
llama.cpp's converter uses), not from jqlora's, and the file is written as
``convert_hf_to_gguf`` writes it: llama's q/k rows interleaved, Gemma's norms stored as
``1 + w``. Each tensor is stored in its own type: F32 norms and biases, a few block
quantizations (``gguf.quants.quantize``) and k-quants (``Q4_K``, ``Q6_K``; gguf cannot
write those, so their blocks are random bytes with finite scales).
"""

from __future__ import annotations

import numpy as np
import torch

ARCH_CLASSES = {  # GGUF architecture -> (transformers config class name, gguf MODEL_ARCH)
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config",
    "gemma3": "Gemma3TextConfig",
    "phi3": "Phi3Config",
}
VOCAB = 320
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
EXTRA = {
    "llama": dict(tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2": dict(tie_word_embeddings=False, rope_theta=1e6),
    "qwen3": dict(tie_word_embeddings=True, head_dim=32, rope_theta=1e6),
    "gemma2": dict(head_dim=32, sliding_window=8, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=256),
    "gemma3": dict(head_dim=32, sliding_window=8, rope_theta=1e6, num_hidden_layers=6,
                   rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "phi3": dict(tie_word_embeddings=False, intermediate_size=128, rope_theta=10000.0),
}  # fmt: skip


def tiny_config(arch: str):
    import transformers

    return getattr(transformers, ARCH_CLASSES[arch])(**{**COMMON, **EXTRA[arch]})


def tiny_model(arch: str, seed: int = 0):
    """A random float32 transformers model (norms and biases moved off their init values)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch), dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _k_quant_bytes(shape, qtype, rng):
    """Random k-quant blocks for a float tensor of ``shape``, with small finite fp16 scales."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape

    raw = rng.integers(0, 256, size=quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    block = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}[qtype]
    blocks = raw.reshape(-1, block)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for at in (0, 2) if qtype != T.Q6_K else (208,):  # d (and dmin) of each block
        blocks[:, at : at + 2] = scale
    return raw


def quant_type_for(hf_name: str, shape: tuple):
    """The storage type of each tensor: several block types, a k-quant where rows allow."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    if shape[-1] % 256 == 0:  # k-quants need rows of whole 256-element super-blocks
        return T.Q6_K if "layers.1" in hf_name else T.Q4_K
    if "embed" in hf_name:
        return T.Q8_0
    if "lm_head" in hf_name:
        return T.F16
    return {0: T.Q4_0, 1: T.Q5_1, 2: T.Q8_0, 3: T.Q4_1}[sum(map(ord, hf_name)) % 4]


def write_gguf(
    model, arch: str, path, *, tokenizer=None, seed: int = 0, quant_type_for=quant_type_for, skip=()
):
    """Write ``model`` to ``path`` as llama.cpp's converter would."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    cfg = model.config
    rng = np.random.default_rng(seed)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope_parameters
    theta = (rope.get("full_attention") or rope)["rope_theta"]
    w.add_rope_freq_base(theta)
    if (rope.get("full_attention") or rope).get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor((rope.get("full_attention") or rope)["factor"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch in ("qwen3", "gemma2", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama" or arch == "phi3":
        w.add_rope_dimension_count(head_dim)
    if arch.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        w.add_tokenizer_model("gpt2")
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t, _ in vocab])
        merges = tokenizer.backend_tokenizer.model.__getstate__()
        import json

        w.add_token_merges(
            [" ".join(m) if isinstance(m, list) else m for m in json.loads(merges)["merges"]]
        )
    state = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        if gguf_name in skip:
            continue
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
            data = permute_rows(data, heads)
        if arch.startswith("gemma") and "norm.weight" in hf_name:
            data = data + 1
        qtype = quant_type_for(hf_name, data.shape)
        if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
            w.add_tensor(gguf_name, _k_quant_bytes(data.shape, qtype, rng), raw_dtype=qtype)
        elif qtype == T.F32:
            w.add_tensor(gguf_name, data)
        elif qtype == T.F16:
            w.add_tensor(gguf_name, data.astype(np.float16))
        else:
            w.add_tensor(gguf_name, quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (``LlamaModel.permute`` in convert_hf_to_gguf)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def transformers_gguf_tensors(path, arch: str) -> dict:
    """``{HF name: float32 array}`` as transformers' GGUF loader reads ``path``."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = tiny_model(arch)  # only its parameter names are used, for the name map
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return {k: np.asarray(v, np.float32) for k, v in loaded["tensors"].items()}
