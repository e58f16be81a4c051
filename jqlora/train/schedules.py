"""Learning-rate schedules by name, as transformers' ``get_scheduler`` defines them.

``make_schedule(name, lr, total_steps, warmup_steps, min_lr_ratio)`` returns an optax schedule
``count -> lr``; optax calls it with the number of updates already applied, so update ``k``
(``k = 1, 2, ...``) runs at ``schedule(k - 1)``, which is transformers' ``LambdaLR`` value
after ``k - 1`` calls of ``scheduler.step()``. With ``w`` warm-up steps, ``T`` total steps
and the factor ``f`` multiplying ``lr``::

    warm-up (t < w, all but constant):   f = t / w
    constant:                            f = 1               (no warm-up, as transformers)
    constant_with_warmup:                f = 1
    linear:                              f = max(0, (T - t) / max(1, T - w))
    cosine:                              f = (1 + cos(pi p)) / 2,  p = (t - w) / max(1, T - w)
    cosine_with_min_lr:                  f = m + (1 - m) (1 + cos(pi p)) / 2,  m = min_lr_ratio

QLoRA's recipe, the default of ``jqlora finetune``, is ``constant_with_warmup`` with a 3 %
warm-up (``warmup_steps(total, ratio=0.03)``).
"""

from __future__ import annotations

import math

import optax

from jqlora.train.choices import DEFAULT_WARMUP_RATIO, SCHEDULES


def warmup_steps(total_steps: int, steps: int | None = None, ratio: float | None = None) -> int:
    """Warm-up updates: ``steps`` when given, else ``ceil(ratio * total_steps)`` (transformers'
    ``TrainingArguments.get_warmup_steps``), the ratio defaulting to QLoRA's 3 %."""
    if steps is not None and ratio is not None:
        raise ValueError("give warm-up steps or a warm-up ratio, not both")
    if steps is not None:
        if steps < 0:
            raise ValueError(f"warm-up steps must be >= 0, got {steps}")
        return int(steps)
    ratio = DEFAULT_WARMUP_RATIO if ratio is None else ratio
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"warm-up ratio must be in [0, 1], got {ratio}")
    return math.ceil(total_steps * ratio)


def make_schedule(
    name: str,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """The schedule ``name`` (one of ``SCHEDULES``) peaking at ``learning_rate``; see the module
    doc for the formulas. ``min_lr_ratio`` is used by ``cosine_with_min_lr`` only."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr scheduler {name!r}; expected one of {', '.join(SCHEDULES)}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if name == "constant" or (name == "constant_with_warmup" and warmup_steps <= 0):
        return optax.constant_schedule(learning_rate)
    decay_steps = max(1, total_steps - warmup_steps)
    if name == "constant_with_warmup":
        after = optax.constant_schedule(learning_rate)
    elif name == "linear":
        after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        alpha = min_lr_ratio if name == "cosine_with_min_lr" else 0.0
        after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=alpha)
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])
