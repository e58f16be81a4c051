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


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, batch size, rank, token counts)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rate, alpha, epochs)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (sampling temperature)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (dropout)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (nucleus sampling's top-p)."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def sequence_length(text: str) -> int:
    """A sequence length: at least 2 tokens, so that one token has a prediction to score."""
    value = _number(text, int)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {text!r}")
    return value


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
