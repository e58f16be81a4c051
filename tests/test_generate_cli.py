"""`jqlora generate` and `jqlora chat` on a tiny Llama with a word-level tokenizer and a
chat template: the printed text is what transformers' greedy decoding produces."""

import io

import pytest
import torch
from adapter_reference import VOCAB, load_torch, peft_config, tiny_configs
from hf_reference import make_tiny

from jqlora.app.cli import main

WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> {% endif %}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a tokenizer (one word per token) and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_chat")
    make_tiny(tiny_configs()["llama"], d)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)
    return d


def _greedy_text(model, tokenizer, prompt_ids, n):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def test_generate_command_prints_transformers_greedy_text(tiny_dir, tmp_path, capsys):
    from peft import get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    peft_model = get_peft_model(load_torch(tiny_dir), peft_config("llama", "plain")).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    prompts = ["w5 w6 w7 w8", "w9 w10"]
    expected = [_greedy_text(peft_model, tokenizer, tokenizer(p)["input_ids"], 6) for p in prompts]

    argv = [
        "generate",
        "--model",
        str(tiny_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--max-new-tokens",
        "6",
    ]
    assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    assert capsys.readouterr().out == f"--- 0\n{expected[0]}\n--- 1\n{expected[1]}\n"


def test_chat_streams_the_reply_to_the_templated_conversation(tiny_dir, monkeypatch, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = load_torch(tiny_dir)
    messages = [{"role": "system", "content": "w4"}, {"role": "user", "content": "w11 w12"}]
    first = _greedy_text(model, tokenizer, _chat_ids(tokenizer, messages), 5)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "w13"}]
    second = _greedy_text(model, tokenizer, _chat_ids(tokenizer, messages), 5)

    monkeypatch.setattr("sys.stdin", io.StringIO("w11 w12\nw13\n/exit\n"))
    assert main(["chat", "--model", str(tiny_dir), "--system", "w4", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def _chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_cli_bad_input(tiny_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "w5"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert (
        main(["generate", "--model", str(tiny_dir), "--adapter", str(tmp_path), "--prompt", "w5"])
        == 2
    )
    assert "adapter_config.json" in capsys.readouterr().err
