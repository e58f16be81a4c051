"""Tiny Gemma 2, Gemma 3 (text), Qwen3 and Phi-3 configs, each with sliding-window layers of
a few tokens, and the eager transformers reference (SDPA ignores Gemma 2's attention
soft-capping). Every linear layer's input width is a multiple of 64, so that bitsandbytes'
CPU dequantize is exact for them too."""

from __future__ import annotations

import torch

WINDOW = 4
VOCAB = 96
_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip


def family_configs() -> dict:
    """family -> transformers config; layer 0 slides a window of `WINDOW` tokens except in
    Qwen3 (layer 1) and Phi-3 (every layer, WINDOW + 1)."""
    import transformers as tf

    return {
        # head_dim 32 apart from hidden / heads; soft-caps below the O(1) logits, so they bite
        "gemma2": tf.Gemma2Config(
            **_BASE, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
            attn_logit_softcapping=0.5, final_logit_softcapping=0.8,
        ),
        # a linear RoPE scaling on the global layer, another base on the sliding one
        "gemma3_text": tf.Gemma3TextConfig(
            **_BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            },
        ),
        "qwen3": tf.Qwen3Config(
            **_BASE, head_dim=32, use_sliding_window=True, sliding_window=WINDOW,
            max_window_layers=1, tie_word_embeddings=False,
        ),
        # half of each head rotated, LongRoPE switching to long factors past 8 positions
        "phi3": tf.Phi3Config(
            **_BASE, sliding_window=WINDOW + 1, original_max_position_embeddings=8,
            rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 5.0, 8.0],
                "original_max_position_embeddings": 8,
            },
        ),
    }  # fmt: skip


FAMILIES = tuple(sorted(family_configs()))

# Every linear layer but the output head: the modules peft's "all-linear" adapts.
TARGETS = {
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def load_eager(model_dir, **kw):
    from transformers import AutoModelForCausalLM

    kw.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", **kw).eval()
