"""A tiny Llama checkpoint with its own tokenizer, for fine-tuning tests (no download).

The tokenizer is a byte-level BPE trained in a second on the text it will see, with
ChatML special tokens and a ChatML chat template; the model is transformers'
``LlamaForCausalLM`` with a random tiny config, saved with ``save_pretrained``. Together
they make a model directory ``jqlora finetune --model DIR`` accepts like a real one.
"""

from __future__ import annotations

import json
import os

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def chat_records(n: int = 24) -> list[dict]:
    """A learnable house-style task: the answer repeats the question's number in a fixed frame."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus zero?"},
                {"role": "assistant", "content": f"Answer: {i}\nWorking: {i} + 0 = {i}."},
            ]
        }
        for i in range(n)
    ]


def make_tokenizer(texts, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def make_tiny_model_dir(path, texts, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """Save a random tiny Llama and a tokenizer trained on ``texts`` into ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(path, exist_ok=True)
    tok = make_tokenizer(texts)
    tok.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def texts_of(records) -> list[str]:
    out = []
    for r in records:
        if "messages" in r:
            out += [m["content"] for m in r["messages"]] + ["user assistant system"]
        else:
            out += [v for v in r.values() if isinstance(v, str)]
    return out
