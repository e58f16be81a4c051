"""Value types for the options of the `jqlora` command and of a run's config file.

Each is an ``argparse`` ``type=``: it turns the text into a value or raises `BadValue`
with the reason, which argparse prints after the option's name (``argument --lr: must be
a finite number > 0, got 'nan'``) and exits with status 2. So a nonsense value is refused
while the command line is parsed, before anything loads. Each also takes a value that is
not text (a config file's number, a Python caller's), and checks it the same way.
"""

from __future__ import annotations

import argparse
import math


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A value an option does not take; the message says what it needs."""


def _number(text, kind: type):
    noun = "an integer" if kind is int else "a number"
    if isinstance(text, str):
        try:
            value = kind(text)
        except ValueError:
            raise BadValue(f"expected {noun}, got {text!r}") from None
    elif isinstance(text, bool) or not isinstance(text, (int, float) if kind is float else int):
        raise BadValue(f"expected {noun}, got {text!r}")
    else:
        value = kind(text)
    if kind is float and not math.isfinite(value):
        raise BadValue(f"must be a finite number, got {text!r}")
    return value


def _bounded(kind: type, accept, requirement: str, doc: str):
    """An option type: a ``kind`` number for which ``accept(value)`` holds."""

    def parse(text):
        value = _number(text, kind)
        if not accept(value):
            raise BadValue(f"must be {requirement}, got {text!r}")
        return value

    parse.__doc__ = doc
    return parse


positive_int = _bounded(
    int, lambda v: v >= 1, "an integer >= 1", "An integer >= 1 (steps, batch size, rank, tokens)."
)
non_negative_int = _bounded(
    int, lambda v: v >= 0, "an integer >= 0", "An integer >= 0 (warm-up steps)."
)
integer = _bounded(int, lambda v: True, "an integer", "An integer (a seed).")
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
        raise BadValue(f"must be one of {', '.join(map(str, BLOCKSIZES))}, got {text!r}")
    return value


def non_empty(value: str) -> str:
    """A string with something in it other than whitespace (a prompt)."""
    if not value.strip():
        raise BadValue("must not be empty")
    return value


def path(value) -> str:
    """A file or directory path (text, or a ``pathlib.Path``)."""
    import os

    if isinstance(value, (str, os.PathLike)) and str(value):
        return os.fspath(value)  # type: ignore[return-value]
    raise BadValue(f"expected a path, got {value!r}")


def boolean(value) -> bool:
    """true or false (a switch's value in a config file)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise BadValue(f"expected true or false, got {value!r}")


def target_modules(value):
    """``"all-linear"`` or a regex as it is; ``"q_proj,v_proj"`` or a list: module names."""
    if isinstance(value, str):
        if "," in value and not any(c in value for c in "^$()[]|*+?\\"):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return tuple(value)
    raise BadValue(f"expected module names or a regex, got {value!r}")


def mesh(value) -> dict[str, int]:
    """Device mesh axes and sizes: ``"data=2,fsdp=4"`` or a mapping ``{data: 2, fsdp: 4}``."""
    from jqlora.sharding import parse_mesh

    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if not isinstance(value, str):
        raise BadValue(f"expected axis=size pairs, got {value!r}")
    try:
        return parse_mesh(value)
    except ValueError as e:
        raise BadValue(str(e)) from None


def quantization(value):
    """A ``QuantConfig``: ``"nf4"``, ``"fp4"``, a mapping of its fields, or ``"none"`` /
    None for a float base."""
    from jqlora.hf.quant_config import as_quant_config

    if isinstance(value, str) and value.lower() == "none":
        return None
    try:
        return as_quant_config(value)
    except ValueError as e:
        raise BadValue(str(e)) from None
