"""What a first-time user of the `jqlora` command meets: every option of every subcommand is
described with its default, a directory is never replaced unasked, and every --model option
takes the model `jqlora finetune` trains by default."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from jqlora.app.cli import build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(group.choices)


def test_every_option_is_described_with_its_default():
    subparsers = _subparsers()
    assert set(subparsers) == {
        "quantize",
        "finetune",
        "estimate-memory",
        "merge",
        "export",
        "generate",
        "chat",
    }
    for name, sub in subparsers.items():
        text = sub.format_help()
        assert sub.epilog and f"jqlora {name}" in sub.epilog, f"{name}: no example"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"jqlora {name} {flag}: no help text"
            shown = action.default is not None and action.default is not False
            if shown and "%(default)" not in action.help:
                assert f"(default: {action.default})" in " ".join(text.split()), (
                    f"jqlora {name} {flag}: default {action.default!r} not shown"
                )
    # a default of 0 is a default too (it was hidden once, being equal to False)
    assert "(default: 0)" in subparsers["finetune"].format_help()


def test_quantize_keeps_a_non_empty_out_dir_unless_forced(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["quantize", str(tmp_path / "missing"), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    # with --force it gets as far as reading the source (which is missing here)
    assert main(["quantize", str(tmp_path / "missing"), str(out), "--force"]) == 2
    assert "missing" in capsys.readouterr().err  # names the source it cannot read
    assert (out / "notes.txt").read_text() == "keep me"  # failed runs replace nothing


@pytest.mark.slow
def test_model_name_and_gguf_file_in_estimate_memory(capsys):
    """estimate-memory reads a llama .gguf file's config, and the default model's name
    means that file: the parameter count equals the elements of the file's tensors."""
    import gguf

    from jqlora.hf.hub import resolve_model
    from jqlora.hf.smollm2 import MODEL_NAME, smollm2_gguf_path
    from jqlora.memory import estimate_memory

    path = str(smollm2_gguf_path(fetch=True))
    assert resolve_model(MODEL_NAME) == path
    assert resolve_model("SmolLM2-135M-Instruct") == path
    assert resolve_model("./some/dir") == "./some/dir"

    n_elements = sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(path).tensors)
    assert estimate_memory(path, batch_size=1, seq_len=64).base_params == n_elements
    assert main(["estimate-memory", "--model", MODEL_NAME, "--seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert f"{n_elements:,} parameters" in printed
    widths = {len(line) for line in printed.splitlines() if line.startswith(("total", "  without"))}
    assert len(widths) == 1  # the two total rows line up
