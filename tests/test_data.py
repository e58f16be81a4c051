"""Training data: formats, loss masks, errors naming file and line, bucketed resumable batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from finetune_tiny import chat_records, make_tokenizer, texts_of, write_jsonl

from jqlora.train import data

RECORDS = [
    {"text": "plain text is all loss"},
    {"prompt": "Q: two plus two?\nA:", "completion": " four"},
    {"instruction": "Say hi", "output": "hi"},
    {"instruction": "Repeat", "input": "abc", "output": "abc"},
] + chat_records(4)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(texts_of(RECORDS) + ["Below is an instruction that describes a task"])


def masked_text(tok, ex):
    return tok.decode(ex.input_ids[ex.loss_mask == 1])


def test_each_format_puts_loss_on_the_answer_only(tmp_path, tok):
    examples, stats = data.load_examples(write_jsonl(tmp_path / "d.jsonl", RECORDS), tok, 256)
    assert stats == {"lines": len(RECORDS), "truncated": 0, "dropped": 0}
    text, pc, alpaca, alpaca_in, chat = examples[:5]
    assert masked_text(tok, text) == "plain text is all loss"
    assert masked_text(tok, pc) == " four<|im_end|>"  # completion and EOS
    assert tok.decode(pc.input_ids[pc.loss_mask == 0]).endswith("Q: two plus two?\nA:")
    assert masked_text(tok, alpaca) == "hi<|im_end|>"
    assert (
        "### Input:\nabc" in tok.decode(alpaca_in.input_ids)
        and masked_text(tok, alpaca_in) == "abc<|im_end|>"
    )
    # chat: the assistant turn and its end marker, not the user turn nor the trailing newline
    assert masked_text(tok, chat) == "Answer: 0\nWorking: 0 + 0 = 0.<|im_end|>"
    full = tok.apply_chat_template(RECORDS[4]["messages"], tokenize=False)
    assert tok.decode(chat.input_ids) == full


def test_multi_turn_chat_masks_every_assistant_turn(tmp_path, tok):
    msgs = [
        {"role": "user", "content": "What is 1 plus zero?"},
        {"role": "assistant", "content": "Answer: 1"},
        {"role": "user", "content": "What is 2 plus zero?"},
        {"role": "assistant", "content": "Answer: 2"},
    ]
    (ex,), _ = data.load_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, 256)
    assert masked_text(tok, ex) == "Answer: 1<|im_end|>Answer: 2<|im_end|>"


def test_chat_template_default_system_prompt_is_rendered_not_learned(tmp_path, tok):
    # Templates such as SmolLM2's add a system turn when there is none; it must get no loss.
    tok2 = make_tokenizer(texts_of(RECORDS))
    tok2.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault helper<|im_end|>\n"
        "{% endif %}"
    ) + tok.chat_template
    (ex,), _ = data.load_examples(write_jsonl(tmp_path / "c.jsonl", chat_records(1)), tok2, 256)
    assert tok2.decode(ex.input_ids).startswith("<|im_start|>system\nDefault helper")
    assert masked_text(tok2, ex) == "Answer: 0\nWorking: 0 + 0 = 0.<|im_end|>"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        ("[1, 2]", "d.jsonl:2: expected a JSON object"),
        ('{"foo": 1}', "d.jsonl:2: unknown example format"),
        ('{"prompt": "a", "completion": 3}', 'd.jsonl:2: "completion" must be a string'),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "d.jsonl:2: the conversation has no assistant",
        ),
        ('{"messages": [{"role": "user"}]}', "d.jsonl:2: messages[0] must be"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, tok, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(data.DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data.load_examples(str(path), tok, 64)


def test_missing_and_empty_files(tmp_path, tok):
    with pytest.raises(data.DataError, match="no such data file"):
        data.load_examples(str(tmp_path / "nope.jsonl"), tok, 64)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match="empty"):
        data.load_examples(str(tmp_path / "e.jsonl"), tok, 64)


def test_long_examples_truncated_texts_windowed(tmp_path, tok):
    long_text = {"text": " ".join(["plain text is all loss"] * 20)}
    records = [
        long_text,
        {"prompt": "Q: two plus two?\nA:" * 10, "completion": " four"},
        RECORDS[1],
    ]
    examples, stats = data.load_examples(write_jsonl(tmp_path / "l.jsonl", records), tok, 16)
    n_text = len(data.tokenize(long_text["text"], [(0, 1000)], tok, True))
    # the text becomes ceil(n/16) windows; the over-long prompt leaves no target: dropped
    assert len(examples) == -(-(n_text - 1) // 16) + 1
    assert all(len(e) <= 16 for e in examples)
    assert stats["dropped"] == 1


def test_split_is_disjoint_and_deterministic():
    exs = [
        data.Example(np.arange(i + 2, dtype=np.int32), np.ones(i + 2, np.uint8)) for i in range(50)
    ]
    train, held = data.split_eval(exs, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert {id(e) for e in train}.isdisjoint({id(e) for e in held})
    assert [len(e) for e in data.split_eval(exs, 0.1, seed=3)[1]] == [len(e) for e in held]
    assert data.split_eval(exs, 0.0, seed=3)[1] == []


def test_batches_are_bucketed_padded_and_addressable():
    lengths = [5, 9, 17, 33, 40, 3, 7]
    exs = [data.Example(np.full(n, n, np.int32), np.ones(n, np.uint8)) for n in lengths]
    stream = data.BatchStream(exs, batch_size=3, seq_len=64, pad_id=0, seed=1)
    assert stream.batches_per_epoch == 3
    seen = []
    for i in range(3):
        b = stream[i]
        assert b["input_ids"].shape[0] == 3 and b["input_ids"].shape[1] in data.bucket_lengths(64)
        rows = b["attention_mask"].sum(1)
        assert (
            b["input_ids"].shape[1]
            == data.bucket_lengths(64)[np.searchsorted(data.bucket_lengths(64), rows.max())]
        )
        for r, n in enumerate(rows):
            assert (b["input_ids"][r, :n] == n).all() and (b["input_ids"][r, n:] == 0).all()
            assert (b["loss_mask"][r, n:] == 0).all()
        seen += [int(n) for n in rows if n]
    assert sorted(seen) == sorted(lengths)  # one epoch sees every example once; last batch padded
    again = data.BatchStream(exs, batch_size=3, seq_len=64, pad_id=0, seed=1)
    for i in (4, 0, 7):  # random access: the same batch whatever was read before
        assert all((again[i][k] == stream[i][k]).all() for k in stream[i])
    order = lambda i: [int(n) for n in stream[i]["attention_mask"].sum(1)]
    assert [order(i) for i in range(3, 6)] != [
        order(i) for i in range(3)
    ]  # a new epoch, a new order


def test_bucket_lengths_bound_the_shapes():
    assert data.bucket_lengths(128) == (32, 48, 64, 96, 128)
    assert data.bucket_lengths(100) == (32, 48, 64, 96, 100)
    assert data.bucket_lengths(16) == (16,)


def test_rare_buckets_merge_into_the_next_one():
    # 2 of 40 batches would fit 64: not worth a compilation; 96 takes them.
    assert data.common_buckets([60] * 2 + [80] * 38, (32, 48, 64, 96, 128), 0.1) == (96,)
    assert data.common_buckets([60] * 10 + [80] * 30, (32, 48, 64, 96, 128), 0.1) == (64, 96)
    assert data.common_buckets([20] * 39 + [120], (32, 48, 64, 96, 128), 0.1) == (32, 128)
    exs = [data.Example(np.ones(n, np.int32), np.ones(n, np.uint8)) for n in [40] * 2 + [90] * 60]
    stream = data.BatchStream(exs, batch_size=1, seq_len=128, pad_id=0, seed=0)
    assert stream.buckets == (96,) and {stream[i]["input_ids"].shape[1] for i in range(62)} == {96}


def test_eval_batches_have_one_shape():
    exs = [data.Example(np.ones(n, np.int32), np.ones(n, np.uint8)) for n in (5, 40, 70, 9, 33)]
    shapes = {b["input_ids"].shape for b in data.eval_batches(exs, 2, 128, 0)}
    assert shapes == {(2, 96)}
    assert sum(int(b["attention_mask"].sum()) for b in data.eval_batches(exs, 2, 128, 0)) == 157
