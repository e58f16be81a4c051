"""Learning-rate schedules against transformers' ``get_scheduler`` (the reference)."""

import math

import numpy as np
import pytest
import torch
from transformers import get_scheduler
from transformers.training_args import TrainingArguments

from jqlora.train.schedules import SCHEDULES, make_schedule, warmup_steps

LR = 2e-4


def _transformers_lrs(name, total, warmup, min_lr_ratio):
    """The lr torch's optimizer uses for each of ``total`` updates under transformers' scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    kwargs = {"min_lr_rate": min_lr_ratio} if name == "cosine_with_min_lr" else None
    sched = get_scheduler(name, opt, warmup, total, scheduler_specific_kwargs=kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])  # the lr of this update
        opt.step()
        sched.step()
    return np.asarray(lrs)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("total,warmup", [(40, 2), (100, 0), (7, 7), (50, 1), (10, 3)])
def test_update_k_runs_at_transformers_lr(name, total, warmup):
    """Update k (1-based) uses schedule(k - 1): optax passes the count of applied updates."""
    min_lr_ratio = 0.1
    expected = _transformers_lrs(name, total, warmup, min_lr_ratio)
    schedule = make_schedule(name, LR, total, warmup, min_lr_ratio)
    got = np.asarray([float(schedule(k - 1)) for k in range(1, total + 1)])
    # optax computes in float32: relative error ~1e-7, absolute below lr * 1e-6.
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=LR * 1e-6)


def test_schedules_differ():
    """The comparison above would pass vacuously if every name gave one schedule."""
    curves = {
        n: tuple(round(float(make_schedule(n, LR, 20, 2, 0.1)(t)), 12) for t in range(20))
        for n in SCHEDULES
    }
    assert len(set(curves.values())) == len(SCHEDULES)


@pytest.mark.parametrize("total", [1, 33, 40, 100, 1000])
@pytest.mark.parametrize("ratio", [0.0, 0.03, 0.1, 0.5])
def test_warmup_ratio_as_transformers(total, ratio):
    args = TrainingArguments(output_dir="/tmp/unused", warmup_steps=ratio, report_to=[])
    assert warmup_steps(total, ratio=ratio) == args.get_warmup_steps(total)


def test_warmup_defaults_and_errors():
    assert warmup_steps(40) == math.ceil(0.03 * 40) == 2
    assert warmup_steps(40, steps=5) == 5
    with pytest.raises(ValueError, match="not both"):
        warmup_steps(40, steps=1, ratio=0.1)
    with pytest.raises(ValueError, match="ratio must be in"):
        warmup_steps(40, ratio=1.5)
    with pytest.raises(ValueError, match="unknown lr scheduler 'cosin'"):
        make_schedule("cosin", LR, 10)
