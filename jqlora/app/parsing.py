"""What every subcommand's parser shares: the help layout, a one-line error, and
``InputError`` for a mistake in what the user gave.

The subcommand modules import these from here, not from ``jqlora.app.cli``, which imports
them in turn (lazily, by name): no module of the command imports another in a circle.
"""

from __future__ import annotations

import argparse
import re
import textwrap


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
