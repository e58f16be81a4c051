"""Where a run reports its metrics besides metrics.jsonl: TensorBoard and Weights & Biases.

``make_loggers(report_to, out, config)`` opens one logger per name of ``report_to`` (``none``,
``tensorboard``, ``wandb``); each takes the lines metrics.jsonl gets (``{"step", "loss",
"lr", "grad_norm", "tokens_per_s", "eval_loss", ...}``) under transformers Trainer's tags
(``TAGS``), so runs of both show up side by side.

* ``tensorboard``: event files in ``OUT/tensorboard/``, written by tensorboardX (no
  TensorFlow needed): ``pip install 'jqlora[tensorboard]'``;
* ``wandb``: a W&B run (project ``jqlora`` unless ``WANDB_PROJECT`` says otherwise; offline
  with ``WANDB_MODE=offline``), its files under ``OUT``: ``pip install 'jqlora[wandb]'``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

REPORT_TO = ("none", "tensorboard", "wandb")

#: metrics.jsonl key -> transformers Trainer's tag
TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_second",
    "eval_loss": "eval/loss",
}

_EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def _require(name: str):
    """The module ``name`` needs, or an ImportError saying how to install it."""
    module, extra = _EXTRAS[name]
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(
            f"--report-to {name} needs the '{module}' package, which is not installed: "
            f"pip install 'jqlora[{extra}]' (or pip install {module})"
        ) from None


def _scalars(line: Mapping[str, Any]) -> dict[str, float]:
    return {TAGS[k]: float(v) for k, v in line.items() if k in TAGS and v is not None}


class TensorBoardLogger:
    """Scalars into TensorBoard event files under ``logdir``."""

    def __init__(self, logdir: str):
        self._writer = _require("tensorboard").SummaryWriter(logdir=logdir)

    def log(self, step: int, line: Mapping[str, Any]) -> None:
        for tag, value in _scalars(line).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """Scalars into a W&B run whose config is the run's settings."""

    def __init__(self, out: str, config: Mapping[str, Any]):
        wandb = _require("wandb")
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "jqlora"),
            dir=out,
            config=dict(config),
            name=os.path.basename(os.path.normpath(out)),
            reinit="finish_previous",
        )

    def log(self, step: int, line: Mapping[str, Any]) -> None:
        self._run.log(_scalars(line), step=step, commit=True)  # each line is a whole step

    def close(self) -> None:
        self._run.finish()


class Loggers:
    """All of a run's loggers as one: ``log(step, line)``, ``close()``."""

    def __init__(self, loggers: Sequence[Any] = ()):
        self.loggers = list(loggers)

    def log(self, step: int, line: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(step, line)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def parse_report_to(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` (or a list) -> ``("tensorboard", "wandb")``; ``none`` alone: ()."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown or not names:
        raise ValueError(
            f"report_to: unknown {', '.join(map(repr, unknown))}; expected a comma-separated "
            f"list of {', '.join(REPORT_TO[1:])}, or none"
        )
    if "none" in names and len(names) > 1:
        raise ValueError("report_to: none cannot be combined with a logger")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def check_installed(report_to: str | Sequence[str]) -> None:
    """Raises ImportError, with the install command, where a logger of ``report_to`` lacks its
    package (checked before a run loads its model)."""
    for name in parse_report_to(report_to):
        _require(name)


def make_loggers(report_to: Sequence[str], out: str, config: Mapping[str, Any]) -> Loggers:
    """The loggers named in ``report_to`` (see `parse_report_to`) for a run writing to ``out``.
    Raises ImportError, with the install command, where a logger's package is missing."""
    loggers: list[Any] = []
    for name in parse_report_to(report_to):
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(os.path.join(out, "tensorboard")))
        else:
            loggers.append(WandbLogger(out, config))
    return Loggers(loggers)
