"""Optimizers by name, all optax: ``make_optimizer(lr, name="adamw", ...)``.

Each is transformers Trainer's optimizer of the same name (``optim=``), with the same
hyper-parameters (``weight_decay``, ``adam_beta1/2``, ``adam_epsilon``, ``max_grad_norm``):

* ``adamw``: ``optax.adamw``, decoupled weight decay (torch's ``AdamW``);
* ``adamw_8bit``: the same update with both moments stored blockwise in 8 bits
  (``jqlora.train.adamw_8bit``; bitsandbytes' ``AdamW8bit``);
* ``lion``: ``optax.lion`` (sign of an interpolated momentum), betas ``b1``, ``b2``;
* ``adafactor``: ``optax.adafactor`` at a fixed learning rate (no parameter scaling, as
  Trainer's ``adafactor`` with ``scale_parameter=False, relative_step=False``);
* ``sgd``: plain SGD, weight decay added to the gradient (torch's ``SGD``).

Before the optimizer the gradients are clipped to global L2 norm ``max_grad_norm``
(QLoRA: 0.3; 0 or None: no clipping). Any other optax ``GradientTransformation`` works in
the train step as well.
"""

from __future__ import annotations

import optax

from jqlora.train.adamw_8bit import MIN_8BIT_SIZE, adamw_8bit
from jqlora.train.choices import OPTIMIZERS

__all__ = ["OPTIMIZERS", "make_optimizer"]


def make_optimizer(
    learning_rate: float | optax.Schedule = 2e-4,
    *,
    name: str = "adamw",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 0.3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """Clipping to ``max_grad_norm`` (0 or None: none), then optimizer ``name`` (module doc).

    ``b1``, ``b2`` are Adam's and Lion's betas, ``eps`` Adam's epsilon; ``min_8bit_size``:
    ``adamw_8bit`` keeps float32 moments for smaller leaves. Wrap the result in
    ``jqlora.offload`` to keep its state in host memory, or in ``optax.MultiSteps`` to
    accumulate gradients over several batches.
    """
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {max_grad_norm}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    lr = learning_rate
    if name == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adamw_8bit":
        opt = adamw_8bit(lr, b1, b2, eps, weight_decay, min_8bit_size)
    elif name == "lion":
        opt = optax.lion(lr, b1=b1, b2=b2, weight_decay=weight_decay)
    elif name == "adafactor":
        opt = optax.adafactor(
            lr, multiply_by_parameter_scale=False, weight_decay_rate=weight_decay or None
        )
    elif name == "sgd":
        opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr))
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if not max_grad_norm:
        return opt
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), opt)
