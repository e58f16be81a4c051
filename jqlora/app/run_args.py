"""What a run's configuration resolves to (the data file, the model file, the number of
steps, the compute dtype, the warm-up), and what a resumed run must agree on with the run
it continues (``OUT/config.yaml``)."""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from typing import Any

import yaml

from jqlora.app import config as config_lib
from jqlora.app import config_io
from jqlora.app.config import DEFAULT_MODEL, DEFAULT_STEPS, FinetuneConfig
from jqlora.train import checkpoint as ckpt
from jqlora.train.schedules import warmup_steps


def default_data_path() -> str:
    """The house-style instruction set shipped with jqlora (see scripts/make_house_style_data.py)."""
    return str(resources.files("jqlora") / "data" / "house_style.jsonl")


def resolve_model_path(model: str) -> str:
    """A model directory, a ``.gguf`` file, or the name of a model jqlora knows how to find."""
    from jqlora.hf.hub import resolve_model

    model = resolve_model(model)
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"model {model!r}: no such directory or file (or use {DEFAULT_MODEL!r})"
        )
    return model


def total_steps(loop: config_lib.LoopConfig, stream) -> int:
    """``loop.steps``, or ``loop.epochs`` over the training set in updates, or DEFAULT_STEPS."""
    if loop.steps is not None:
        steps = loop.steps
    elif loop.epochs is not None:
        updates_per_epoch = -(-stream.batches_per_epoch // loop.grad_accum)
        steps = max(1, round(loop.epochs * updates_per_epoch))
    else:
        steps = DEFAULT_STEPS
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return steps


def resolve(config: FinetuneConfig, data: str, steps: int, compute_dtype) -> FinetuneConfig:
    """``config`` with what its defaults stand for written out: the data files' absolute
    paths, the compute dtype, the warm-up in steps (``--warmup-ratio``, default 3 %, of
    ``steps``, rounded up as transformers does): the settings config.yaml records, with
    which ``--config`` repeats the run."""
    s, d = config.schedule, config.data
    eval_data = None if d.eval_data is None else os.path.abspath(d.eval_data)
    return dataclasses.replace(
        config,
        data=dataclasses.replace(d, path=os.path.abspath(data), eval_data=eval_data),
        model=dataclasses.replace(config.model, compute_dtype=compute_dtype.name),
        schedule=dataclasses.replace(
            s, warmup_steps=warmup_steps(steps, s.warmup_steps, s.warmup_ratio), warmup_ratio=None
        ),
    )


def checkpoint_to_resume(config: FinetuneConfig) -> str | None:
    """The newest checkpoint in the output directory when resuming (None: start afresh).

    Raises ``ValueError`` where the directory holds checkpoints and ``resume`` is off, or
    where ``config`` (resolved) differs from the run's ``config.yaml`` in an option a
    resumed run must keep; the message names each such option."""
    out = config.output.dir
    latest = ckpt.latest_checkpoint(os.path.join(out, "checkpoints"))
    if latest and not config.loop.resume:
        raise ValueError(
            f"{out} already holds checkpoints of a run; pass resume=True (--resume) or another output directory"
        )
    if latest:
        saved = read_saved_config(out)
        diff = config_io.differences(saved, config)
        if diff:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{latest}: cannot resume with different settings than "
                f"{os.path.join(out, config_io.CONFIG_FILE)} (saved -> now): {listed}"
            )
    return latest


def read_saved_config(out: str) -> dict[str, Any]:
    """The options a run in ``out`` wrote to its config.yaml."""
    path = os.path.join(out, config_io.CONFIG_FILE)
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(
            f"{out} holds checkpoints but no {config_io.CONFIG_FILE}: its settings are unknown, "
            "so it cannot be resumed"
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a mapping of option: value")
    return saved
