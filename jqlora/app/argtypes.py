"""Value types for the options of the `jqlora` command.

Each is an ``argparse`` ``type=``: it turns the text into a value or raises
``argparse.ArgumentTypeError`` with the reason, which argparse prints after the option's
name (``argument --lr: must be a finite number > 0, got 'nan'``) and exits with status 2.
So a nonsense value is refused while the command line is parsed, before anything loads.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _bounded(kind: type, accept, requirement: str, doc: str):
    """An option type: a ``kind`` number for which ``accept(value)`` holds."""

    def parse(text: str):
        value = _number(text, kind)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    parse.__doc__ = doc
    return parse


positive_int = _bounded(
    int, lambda v: v >= 1, "an integer >= 1", "An integer >= 1 (steps, batch size, rank, tokens)."
)
positive_float = _bounded(
    float, lambda v: v > 0, "a number > 0", "A finite number > 0 (learning rate, alpha, epochs)."
)
non_negative_float = _bounded(
    float, lambda v: v >= 0, "a number >= 0", "A finite number >= 0 (sampling temperature)."
)
fraction = _bounded(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)", "A number in [0, 1) (dropout).")
probability = _bounded(
    float, lambda v: 0.0 < v <= 1.0, "in (0, 1]", "A number in (0, 1] (nucleus sampling's top-p)."
)
#: at least 2 tokens, so that one token has a prediction to score
sequence_length = _bounded(int, lambda v: v >= 2, "an integer >= 2", "A sequence length (>= 2).")


def blocksize(text: str) -> int:
    """A quantization blocksize that bitsandbytes allows (a power of two, 32 to 4096)."""
    from jqlora.quant import BLOCKSIZES

    value = _number(text, int)
    if value not in BLOCKSIZES:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(map(str, BLOCKSIZES))}, got {text!r}"
        )
    return value


def non_empty(value: str) -> str:
    """A string with something in it other than whitespace (a prompt)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value
