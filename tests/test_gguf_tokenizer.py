"""The tokenizer of a GGUF file without PyTorch (``jqlora.hf.tokenizer``): it equals the one
transformers' ``AutoTokenizer`` builds from the same file, and it loads where torch cannot
be imported, as after ``pip install jqlora`` (torch is a test dependency only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jqlora.app.run_args import default_data_path
from jqlora.hf.smollm2 import smollm2_gguf_path
from jqlora.hf.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world",
    "  leading spaces, tabs\tand\nnew lines\r\n",
    "Ünïcödé, emoji 🙂 and 中文 text",
    "special tokens inline: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "numbers 1234567 and code: def f(x): return x**2",
]


@pytest.fixture(scope="module")
def tokenizers():
    import transformers as tf

    path = smollm2_gguf_path(fetch=True)
    reference = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return path, reference, load_tokenizer(path)


def test_special_tokens_and_template_equal_transformers(tokenizers):
    _, reference, ours = tokenizers
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(reference, name), name
        assert getattr(ours, name + "_id") == getattr(reference, name + "_id"), name
    assert len(ours) == len(reference)
    assert ours.chat_template == reference.chat_template
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is NF4?"},
        {"role": "assistant", "content": "A 4-bit data type."},
        {"role": "user", "content": "And FP4?"},
    ]
    for m in (messages, messages[1:2]):
        assert ours.apply_chat_template(
            m, tokenize=False, add_generation_prompt=True
        ) == reference.apply_chat_template(m, tokenize=False, add_generation_prompt=True)


def test_encodings_and_decodings_equal_transformers(tokenizers):
    _, reference, ours = tokenizers
    with open(default_data_path(), encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:40]
    texts = TEXTS + [json.dumps(r, ensure_ascii=False) for r in records]
    for text in texts:
        want = reference(text)["input_ids"]
        assert ours(text)["input_ids"] == want, text
        assert (
            ours(text, add_special_tokens=False)["input_ids"]
            == (reference(text, add_special_tokens=False)["input_ids"])
        )
        assert ours.decode(want) == reference.decode(want)
        assert ours.decode(want, skip_special_tokens=True) == reference.decode(
            want, skip_special_tokens=True
        )


def test_loads_without_torch(tokenizers):
    """torch made unimportable in a fresh interpreter: the finetune and generate paths still
    import, and the tokenizer loads and encodes as transformers' does."""
    path, reference, _ = tokenizers
    text = TEXTS[3]
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import jqlora, jqlora.app.loop, jqlora.app.generate_cli\n"
        "from jqlora.train.data import load_tokenizer\n"
        f"print(load_tokenizer({str(path)!r})({text!r})['input_ids'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == reference(text)["input_ids"]


def test_saved_tokenizer_loads_in_transformers(tokenizers, tmp_path):
    """`jqlora merge` from a GGUF base writes this tokenizer beside the merged weights:
    ``AutoTokenizer`` reads it back from the directory as the GGUF file's own."""
    import transformers as tf

    _, reference, ours = tokenizers
    ours.save_pretrained(tmp_path)
    again = tf.AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == reference.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    for text in TEXTS:
        assert again(text)["input_ids"] == reference(text)["input_ids"], text
