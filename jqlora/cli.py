"""The `jqlora` command. Each subcommand lives beside the code it drives and registers here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed args; returns an exit code). Modules load lazily so that
``jqlora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module defining register(subparsers)
SUBCOMMANDS = {
    "quantize": "jqlora.hf.quantize_cli",
    "finetune": "jqlora.train.finetune_cli",
    "estimate-memory": "jqlora.memory_cli",
    "merge": "jqlora.hf.merge_cli",
    "generate": "jqlora.generate_cli",
    "chat": "jqlora.generate_cli",
}


class InputError(Exception):
    """A mistake in what the user gave (path, value, file): printed without a traceback, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jqlora", description="QLoRA fine-tuning in pure JAX.")
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
    sys.exit(main())
