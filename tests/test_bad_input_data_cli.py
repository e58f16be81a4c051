"""Bad training data and bad command lines.

Data files: every mistake is a ``DataError`` naming ``file:line`` and what was expected,
found by ``check_data_file`` (no tokenizer, what ``jqlora finetune`` runs before loading
anything) and by ``load_examples`` alike. An example longer than ``--seq-len`` is not an
error: it is truncated, and one ``DataWarning`` names the first such line; only a file where
truncation leaves no answer token at all is an error.

Command lines: each nonsense value or path makes ``jqlora <command>`` exit with status 2
and print exactly one line, ``jqlora <command>: error: ...``, naming the option or file,
with no traceback. The tests call ``jqlora.app.cli.main`` in-process with model loading
replaced by a failure, which proves each check runs before any model loads; two runs in a
real subprocess confirm the exit status and the absence of a traceback end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from finetune_tiny import chat_records, make_tokenizer, texts_of, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jqlora
from jqlora.app.cli import main
from jqlora.lora import LoraConfig
from jqlora.models import model_for_config
from jqlora.train import data

FAST = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
GOOD = [{"text": "plain text is all loss"}, {"prompt": "Q: one?\nA:", "completion": " one"}]
RECORDS = GOOD + chat_records(3)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(texts_of(RECORDS) + ["Below is an instruction that describes a task"])


def write_lines(path, lines) -> str:
    """A data file with the good records first and ``lines`` (raw text) after them."""
    with open(path, "w", encoding="utf-8") as f:
        for r in GOOD:
            f.write(json.dumps(r) + "\n")
        for line in lines:
            f.write(line + "\n")
    return str(path)


def both_refuse(path, tok, match):
    """check_data_file (no tokenizer) and load_examples raise the same DataError."""
    with pytest.raises(data.DataError, match=match) as first:
        data.check_data_file(path)
    with pytest.raises(data.DataError, match=match) as second:
        data.load_examples(path, tok, 64)
    assert str(first.value) == str(second.value)


# ------------------------------------------------------------------ lines


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@FAST
@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_a_line_that_is_json_but_not_an_object(tmp_path, tok, value):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(value)])
    both_refuse(path, tok, r"d.jsonl:3: expected a JSON object, got (an? \w+|null)")


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return bool(text.strip())
    return False


@FAST
@given(
    line=st.tuples(
        st.sampled_from(["", "{", "[", '{"text": ', '{"messages": [']),
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r")),
    )
    .map("".join)
    .filter(_not_json)
)
def test_a_line_that_is_not_json(tmp_path, tok, line):
    path = write_lines(tmp_path / "d.jsonl", [line])
    both_refuse(path, tok, r"d.jsonl:3: not valid JSON \(")


FIELDS = {
    "text": ({"text": "a"}, ["text"]),
    "prompt/completion": ({"prompt": "a", "completion": "b"}, ["prompt", "completion"]),
    "alpaca": (
        {"instruction": "a", "input": "b", "output": "c"},
        ["instruction", "input", "output"],
    ),
}


@FAST
@given(
    fmt=st.sampled_from(sorted(FIELDS)),
    pick=st.integers(0, 2),
    value=json_values.filter(lambda v: not isinstance(v, str)),
)
def test_a_field_of_the_wrong_type(tmp_path, tok, fmt, pick, value):
    record, fields = FIELDS[fmt]
    field = fields[pick % len(fields)]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({**record, field: value})])
    both_refuse(path, tok, rf'd.jsonl:3: "{field}" must be a string, got ')


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a"}, 'missing "completion" \\(the line has "prompt"\\)'),
        ({"completion": "a"}, 'missing "prompt"'),
        ({"instruction": "a"}, 'missing "output"'),
        ({"output": "a", "input": "b"}, 'missing "instruction"'),
        ({"foo": 1, "Text": "a"}, r"unknown example format with keys \['Text', 'foo'\]; expected"),
        ({}, r"unknown example format with keys \[\]"),
        ({"messages": "hi"}, '"messages" must be a non-empty list, got a string'),
        ({"messages": []}, '"messages" must be a non-empty list, got an empty array'),
        (
            {"messages": [{"role": "user"}]},
            r'messages\[0\] must be \{"role": str, "content": str\}',
        ),
        ({"messages": [["user", "hi"]]}, r"messages\[0\] must be"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "the conversation has no assistant message to learn from",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                ]
            },
            "the conversation has no assistant message",
        ),
    ],
)
def test_missing_fields_and_malformed_chats(tmp_path, tok, record, message):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(record)])
    both_refuse(path, tok, f"d.jsonl:3: {message}")


@FAST
@given(role=st.text(min_size=1, max_size=12).filter(lambda r: r not in data.CHAT_ROLES))
def test_an_unknown_chat_role(tmp_path, tok, role):
    """A template renders any role string it is given (ChatML writes ``<|im_start|>wizard``);
    a misspelt ``asistant`` would then train on the wrong turns, so it is refused."""
    record = {"messages": [{"role": role, "content": "hi"}, {"role": "assistant", "content": "x"}]}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(record)])
    both_refuse(path, tok, r"d.jsonl:3: messages\[0\] has unknown role .*; expected one of system")


# ------------------------------------------------------------------ files


def test_empty_and_blank_files(tmp_path, tok):
    (tmp_path / "e.jsonl").write_text("")
    both_refuse(str(tmp_path / "e.jsonl"), tok, r"e.jsonl: no examples: the file is empty;")
    (tmp_path / "b.jsonl").write_text("\n   \n\t\n")
    both_refuse(
        str(tmp_path / "b.jsonl"), tok, r"b.jsonl: no examples: the file is empty but for 3 blank"
    )


def test_missing_file_and_directory(tmp_path, tok):
    both_refuse(str(tmp_path / "nope.jsonl"), tok, "nope.jsonl: no such data file")
    both_refuse(str(tmp_path), tok, "is a directory, not a JSON Lines data file")


def test_bytes_that_are_not_utf8_name_the_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    both_refuse(str(path), tok, r"d.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)")


def test_a_byte_order_mark_is_accepted(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "plain text is all loss"}\n')
    assert data.check_data_file(str(path)) == 1
    examples, _ = data.load_examples(str(path), tok, 64)
    assert len(examples) == 1


def test_absurd_json_is_an_error_with_its_line(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": 1' + "0" * 5000 + "}"])
    both_refuse(path, tok, r"d.jsonl:3: not valid JSON \(Exceeds the limit")
    path = write_lines(tmp_path / "d.jsonl", ["[" * 100_000 + "]" * 100_000])
    both_refuse(path, tok, r"d.jsonl:3: not valid JSON \(maximum recursion depth")


# ------------------------------------------------------------------ longer than seq_len


def test_examples_longer_than_seq_len_are_truncated_with_a_warning(tmp_path, tok):
    """Decision: truncate, do not fail. The run keeps every usable example; a DataWarning
    (and the count in finetune's log) says how many were cut and names the first line.
    Texts are cut into windows instead (nothing lost, no warning)."""
    records = [
        {"prompt": "Q: one?\nA:", "completion": " one" * 40},  # cut, answer partly kept
        {"prompt": "Q: one?\nA:" * 20, "completion": " one"},  # cut, no answer left: dropped
        {"text": "plain text is all loss " * 20},  # windowed
        GOOD[1],
    ]
    path = write_jsonl(tmp_path / "l.jsonl", records)
    with pytest.warns(
        data.DataWarning,
        match=r"l.jsonl: 2 example\(s\) longer than seq_len=16 tokens were cut to it \(first: "
        r"line 1\); 1 left without an answer token were dropped \(first: line 2\)",
    ):
        examples, stats = data.load_examples(path, tok, 16)
    assert stats == {"lines": 4, "truncated": 2, "dropped": 1}
    assert all(len(e) <= 16 for e in examples) and len(examples) > 3


def test_a_file_left_without_answers_by_truncation_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "Q: one?\nA:" * 20, "completion": " x"}])
    with pytest.raises(
        data.DataError,
        match=r"l.jsonl: no example has a token to learn from within seq_len=16 \(1 of 1 cut to "
        r"seq_len left no answer token; raise --seq-len",
    ):
        data.load_examples(path, tok, 16)


@pytest.mark.parametrize("seq_len", [0, 1, -5, 2.5, True])
def test_seq_len_must_hold_a_prediction(tmp_path, tok, seq_len):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    with pytest.raises(data.DataError, match=r"seq_len must be an integer >= 2"):
        data.load_examples(path, tok, seq_len)


# ================================================================== the command line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    """``{"model", "data", "adapter", ...}``: a tiny Llama with a tokenizer, a data file,
    a PEFT adapter for it, and broken variants of each."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    config = {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    model = model_for_config(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    jqlora.save_hf(model_dir, model, params)
    tok.save_pretrained(model_dir)
    lora_config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    lora = jqlora.init_lora(jax.random.key(0), params, lora_config)
    jqlora.save_peft_adapter(root / "adapter", lora, lora_config)

    paths = {"model": model_dir, "adapter": root / "adapter", "root": root}
    paths["data"] = write_jsonl(root / "data.jsonl", RECORDS)
    paths["bad_data"] = write_lines(root / "bad.jsonl", ['{"text": "ok"}', "{not json"])
    (root / "empty.jsonl").write_text("")
    (root / "a_file").write_text("not a directory")
    (root / "garbage.gguf").write_bytes(b"definitely not GGUF")
    (root / "no_config").mkdir()
    for name, text in (("bad_json", "{oops"), ("bert", json.dumps({"model_type": "bert"}))):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
    (root / "no_tokenizer").mkdir()
    for f in ("config.json", "model.safetensors"):
        (root / "no_tokenizer" / f).write_bytes((model_dir / f).read_bytes())
    (root / "bad_adapter").mkdir()
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (root / "bad_adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    for f in ("adapter_model.safetensors",):
        (root / "bad_adapter" / f).write_bytes((root / "adapter" / f).read_bytes())
    (root / "garbage_weights").mkdir()
    (root / "garbage_weights" / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (root / "garbage_weights" / "model.safetensors").write_bytes(b"\x00" * 7)
    return paths


@pytest.fixture
def no_loading(monkeypatch):
    """Any model loading fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    import jqlora.app.loop
    import jqlora.app.merge_cli
    import jqlora.hf

    monkeypatch.setattr(jqlora.hf, "load_hf", refuse)
    monkeypatch.setattr(jqlora.app.loop, "finetune", refuse)
    monkeypatch.setattr(jqlora.app.merge_cli, "merge_checkpoint", refuse)


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    _, err = capsys.readouterr()
    return rc, [line for line in err.splitlines() if line.strip()], err


def assert_one_line_error(argv, capsys, needle):
    rc, lines, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"jqlora {argv[0]}: error: ") or lines[0].startswith("jqlora: "), err
    assert needle in lines[0], (needle, lines[0])


FINETUNE_FLAGS = [
    (["--steps", "-1"], "argument --steps: must be an integer >= 1, got '-1'"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
    (["--steps", "5", "--epochs", "1"], "argument --epochs: not allowed with argument --steps"),
    (["--epochs", "0"], "argument --epochs: must be a number > 0"),
    (["--epochs", "nan"], "argument --epochs: must be a finite number, got 'nan'"),
    (["--lr", "0"], "argument --lr: must be a number > 0, got '0'"),
    (["--lr", "-1e-3"], "argument --lr: must be a number > 0, got '-1e-3'"),
    (["--lr=-2"], "argument --lr: must be a number > 0"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),
    (["--lora-r", "0"], "argument --lora-r: must be an integer >= 1, got '0'"),
    (["--lora-r", "1.5"], "argument --lora-r: expected an integer, got '1.5'"),
    (["--lora-alpha", "0"], "argument --lora-alpha: must be a number > 0"),
    (["--lora-dropout", "1"], r"argument --lora-dropout: must be in [0, 1), got '1'"),
    (["--lora-dropout", "abc"], "argument --lora-dropout: expected a number, got 'abc'"),
    (["--seq-len", "0"], "argument --seq-len: must be an integer >= 2, got '0'"),
    (["--seq-len", "1"], "argument --seq-len: must be an integer >= 2, got '1'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--grad-accum", "-2"], "argument --grad-accum: must be an integer >= 1"),
    (["--eval-every", "0"], "argument --eval-every: must be an integer >= 1"),
    (["--save-every", "0"], "argument --save-every: must be an integer >= 1"),
    (["--quant", "int8"], "argument --quant: invalid choice: 'int8'"),
    (["--mesh", "foo=2"], "argument --mesh: --mesh 'foo=2': expected name=size pairs"),
    (["--target-modules", "("], "target_modules '(' is not a valid regex"),
    (["--target-modules", "bogus_proj"], "target module(s) 'bogus_proj' select no linear layer"),
    (["--target-modules", "q_proj,bogus"], "target module(s) 'bogus' select no linear layer"),
    (["--target-modules", "^nothing$"], "target module(s) '^nothing$' select no linear layer"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
]


@pytest.mark.parametrize(
    "flags, needle", FINETUNE_FLAGS, ids=[" ".join(f) for f, _ in FINETUNE_FLAGS]
)
def test_finetune_nonsense_values(tiny, no_loading, capsys, flags, needle):
    argv = ["finetune", "--model", tiny["model"], "--data", tiny["data"]]
    argv += ["--out", tiny["root"] / "run", *flags]
    assert_one_line_error(argv, capsys, needle)


FINETUNE_PATHS = [
    ("model", "/nonexistent/model", "--model /nonexistent/model: no such directory or file"),
    ("model", "no_config", "no_config: no config.json"),
    ("model", "bad_json", "bad_json/config.json: not valid JSON"),
    ("model", "bert", "bert/config.json: unsupported model_type 'bert'"),
    ("model", "garbage.gguf", "garbage.gguf: not a GGUF file"),
    ("model", "no_tokenizer", "no_tokenizer: no tokenizer in the directory"),
    ("data", "/nonexistent/data.jsonl", "/nonexistent/data.jsonl: no such data file"),
    ("data", "no_config", "no_config: is a directory, not a JSON Lines data file"),
    ("data", "bad.jsonl", "bad.jsonl:4: not valid JSON"),
    ("data", "empty.jsonl", "empty.jsonl: no examples: the file is empty"),
    ("out", "a_file", "--out {root}/a_file: exists and is not a directory"),
]


@pytest.mark.parametrize("which, value, needle", FINETUNE_PATHS)
def test_finetune_bad_paths(tiny, no_loading, capsys, which, value, needle):
    paths = {"model": tiny["model"], "data": tiny["data"], "out": tiny["root"] / "run"}
    paths[which] = value if value.startswith("/") else tiny["root"] / value
    argv = ["finetune", "--steps", "1"]
    for flag, path in paths.items():
        argv += [f"--{flag}", path]
    assert_one_line_error(argv, capsys, needle.format(root=tiny["root"]))


def test_quantize_bad_arguments(tiny, capsys):
    root, model = tiny["root"], tiny["model"]
    cases = [
        (["/nonexistent", root / "q"], "/nonexistent: no such file or directory"),
        ([root / "a_file", root / "q"], "a_file: not a checkpoint"),
        ([root / "no_config", root / "q"], "no_config: no config.json"),
        ([root / "bert", root / "q"], "unsupported model_type 'bert'"),
        ([root / "garbage_weights", root / "q"], "model.safetensors: not a safetensors file"),
        ([model, root / "q", "--blocksize", "48"], "argument --blocksize: must be one of 32, 64"),
        ([model, root / "q", "--blocksize", "x"], "argument --blocksize: expected an integer"),
        ([model, root / "q", "--quant-type", "int4"], "argument --quant-type: invalid choice"),
        ([model, root / "a_file"], "a_file: exists and is not a directory"),
    ]
    for argv, needle in cases:
        assert_one_line_error(["quantize", *argv], capsys, needle)
    assert not (root / "q").exists()


def test_merge_bad_arguments(tiny, no_loading, capsys):
    root, model, adapter = tiny["root"], tiny["model"], tiny["adapter"]
    out = ["--out", root / "merged"]
    cases = [
        (["--model", "/nonexistent", "--adapter", adapter, *out], "--model /nonexistent: no such"),
        (["--model", model, "--adapter", "/nonexistent", *out], "--adapter /nonexistent: no such"),
        (["--model", model, "--adapter", root / "no_config", *out], "no adapter_config.json"),
        (
            ["--model", model, "--adapter", root / "bad_adapter", *out],
            "adapter_config.json: r must be a positive integer, got 0",
        ),
        (["--model", root / "garbage.gguf", "--adapter", adapter, *out], "not a GGUF file"),
        (["--model", root / "bert", "--adapter", adapter, *out], "unsupported model_type"),
        (
            ["--model", model, "--adapter", adapter, "--out", root / "a_file"],
            "a_file: exists and is not a directory",
        ),
        (["--model", model, "--adapter", adapter, *out, "--dtype", "int8"], "argument --dtype"),
        (["--model", model, "--adapter", adapter, *out, "--quantize", "int4"], "--quantize"),
        (["--model", model, *out], "the following arguments are required: --adapter"),
    ]
    for argv, needle in cases:
        assert_one_line_error(["merge", *argv], capsys, needle)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_bad_arguments(tiny, no_loading, capsys, command):
    root, model = tiny["root"], tiny["model"]
    prompt = ["--prompt", "hi"] if command == "generate" else []
    cases = [
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
        (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be an integer >= 1"),
        (["--temperature", "-1"], "argument --temperature: must be a number >= 0, got '-1'"),
        (["--temperature", "nan"], "argument --temperature: must be a finite number"),
        (["--top-k", "0"], "argument --top-k: must be an integer >= 1"),
        (["--top-p", "0"], "argument --top-p: must be in (0, 1], got '0'"),
        (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got '1.5'"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
        (["--adapter", "/nonexistent"], "--adapter /nonexistent: no such directory"),
        (["--adapter", root / "bad_adapter"], "r must be a positive integer, got 0"),
    ]
    for flags, needle in cases:
        assert_one_line_error([command, "--model", model, *prompt, *flags], capsys, needle)
    for bad, needle in (
        ("/nonexistent", "--model /nonexistent: no such file or directory"),
        (root / "garbage.gguf", "garbage.gguf: not a GGUF file"),
        (root / "no_tokenizer", "no_tokenizer: no tokenizer in the directory"),
        (root / "bad_json", "config.json: not valid JSON"),
    ):
        assert_one_line_error([command, "--model", bad, *prompt], capsys, needle)
    if command == "generate":
        assert_one_line_error(
            ["generate", "--model", model, "--prompt", " "], capsys, "argument --prompt: must not"
        )
        assert_one_line_error(
            ["generate", "--model", model], capsys, "the following arguments are required: --prompt"
        )


def test_estimate_memory_bad_arguments(tiny, capsys):
    root, model = tiny["root"], tiny["model"]
    cases = [
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["--seq-len", "0"], "argument --seq-len: must be an integer >= 1"),
        (["--seq-len", "-4"], "argument --seq-len: must be an integer >= 1, got '-4'"),
        (["--lora-r", "0"], "argument --lora-r: must be an integer >= 1"),
        (["--lora-alpha", "-1"], "argument --lora-alpha: must be a number > 0"),
        (["--blocksize", "48"], "argument --blocksize: must be one of"),
        (["--quant", "int8"], "argument --quant: invalid choice"),
        (["--backend", "cuda"], "argument --backend: invalid choice"),
        (["--compute-dtype", "int8"], "argument --compute-dtype: invalid choice"),
        (["--target-modules", "bogus"], "target module(s) 'bogus' select no linear layer"),
        (["--target-modules", "q_proj,bogus"], "target module(s) 'bogus' select no linear layer"),
        (["--mesh", "foo=3"], "--mesh 'foo=3': expected name=size pairs"),
    ]
    for flags, needle in cases:
        assert_one_line_error(["estimate-memory", "--model", model, *flags], capsys, needle)
    for bad, needle in (
        ("/nonexistent", "/nonexistent: no such config file"),
        (root / "garbage.gguf", "garbage.gguf: not a GGUF file"),
        (root / "bad_json", "config.json: not valid JSON"),
        (root / "bert", "unsupported model_type 'bert'"),
    ):
        assert_one_line_error(["estimate-memory", "--model", bad], capsys, needle)


def test_unknown_command(capsys):
    assert_one_line_error(["nonsense"], capsys, "argument COMMAND: invalid choice: 'nonsense'")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["finetune", "--lr", "0"], "jqlora finetune: error: argument --lr: must be a number > 0"),
        (["finetune", "--model", "{model}", "--data", "{bad}"], "bad.jsonl:4: not valid JSON"),
    ],
)
def test_a_real_process_exits_2_with_one_line(tiny, argv, needle):
    argv = [a.format(model=tiny["model"], bad=tiny["bad_data"]) for a in argv]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "jqlora", *argv, "--out", str(tiny["root"] / "proc")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]
