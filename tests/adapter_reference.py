"""Tiny models of every family with PEFT adapters: the references the PEFT, merge and
generation tests compare jqlora against."""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch

VOCAB = 96


def tiny_configs() -> dict:
    """One tiny transformers config per model family (GQA for Llama, Conv1D for GPT-2)."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    return {
        "llama": LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        "opt": OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
        ),
        "gpt2": GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
            eos_token_id=2, pad_token_id=0,
        ),
    }  # fmt: skip


# Every linear layer but the output head, per family (PEFT needs names, not "all-linear",
# to reproduce exactly the layers jqlora's "all-linear" selects).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}

# A second rank / alpha for one module name, to cover rank_pattern and alpha_pattern.
PATTERNED = {"llama": "v_proj", "opt": "v_proj", "gpt2": "c_fc"}

VARIANTS = {
    "plain": dict(use_rslora=False, use_dora=False),
    "rslora": dict(use_rslora=True, use_dora=False),
    "dora": dict(use_rslora=False, use_dora=True),
}


def llama64_config():
    """A tiny Llama whose weights all have a last dimension that is a multiple of 64:
    bitsandbytes' CPU dequantize is wrong for other multiples of 16."""
    config = tiny_configs()["llama"]
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    return config


def bnb_nf4_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def exact_nf4(model):
    """Switches off bitsandbytes' AVX512-BF16 repack on the first CPU forward (not exact NF4)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


def peft_config(family: str, variant: str, **overrides):
    """A peft LoraConfig with a non-zero B (``init_lora_weights=False``) and patterns."""
    from peft import LoraConfig

    kwargs = dict(
        r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False, task_type="CAUSAL_LM",
        rank_pattern={PATTERNED[family]: 2}, alpha_pattern={PATTERNED[family]: 3},
        fan_in_fan_out=family == "gpt2", **VARIANTS[variant],
    )  # fmt: skip
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def load_torch(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def torch_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
            attention_mask=None
            if mask is None
            else torch.as_tensor(np.asarray(mask), dtype=torch.long),
        )
    return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, ids, mask):
    return model.apply(variables, ids, attention_mask=mask)


def jqlora_logits(model, params, ids, lora=None, mask=None) -> np.ndarray:
    """The model's logits, jitted (op-by-op dispatch of a whole model is slow)."""
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    return np.asarray(
        _apply(model, variables, np.asarray(ids), None if mask is None else np.asarray(mask))
    )
