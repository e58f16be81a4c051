"""What a training run does about a step whose loss, gradients or update are NaN or inf.

The train step (``make_train_step(..., skip_nonfinite=True)``) already keeps such an update
out of the state; ``finetune`` then stops or skips (``on_nonfinite``) with these pieces.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jqlora.train import checkpoint as ckpt

# With on_nonfinite="skip", this many non-finite steps in a row stop the run anyway: the
# adapter is unchanged by them, so a streak means the data or the learning rate is at fault.
MAX_CONSECUTIVE_NONFINITE = 5


class NonFiniteLossError(RuntimeError):
    """Training stopped at ``step`` because its loss, gradients or update were NaN or inf.

    ``checkpoint`` is the newest checkpoint, which holds the last good state (None when
    the run stopped before it had one); nothing non-finite was written.
    """

    def __init__(self, step: int, reason: str, streak: int, checkpoint: str | None, mode: str):
        self.step, self.reason, self.checkpoint = step, reason, checkpoint
        if mode == "stop":
            what = f"step {step}: {reason}; training stopped (on_nonfinite='stop')"
        else:
            what = f"step {step}: {reason}; {streak} non-finite steps in a row, training stopped"
        kept = (
            f"checkpoint {checkpoint} holds the last good state" if checkpoint else "no checkpoint"
        )
        super().__init__(
            f"{what}. No adapter was written; {kept}. Lower the learning rate or check the data, "
            "or resume with on_nonfinite='skip' (--resume --on-nonfinite skip) to skip such steps"
        )


def reason(loss: float, grad_norm: float) -> str:
    """Which of the step's numbers was not finite, in words."""
    if not np.isfinite(loss):
        return f"the loss is {loss}"
    if not np.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm} (loss {loss:.4f})"
    return f"the update would make the adapter or optimizer state non-finite (loss {loss:.4f})"


def undo_partial_accumulation(state, applied: int):
    """``state`` as it was before a discarded accumulated update: ``optax.MultiSteps``'
    partial gradient sum emptied and the ``applied`` micro-batch calls that went into it
    taken off ``state.step``. (The sum's zeros may differ from the old ones in sign only.)"""

    def empty(s):
        if not isinstance(s, optax.MultiStepsState):
            return s
        zeros = lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding)
        return s._replace(mini_step=zeros(s.mini_step), acc_grads=jax.tree.map(zeros, s.acc_grads))

    is_multi = lambda s: isinstance(s, optax.MultiStepsState)
    return state._replace(
        step=state.step - applied,
        opt_state=jax.tree.map(empty, state.opt_state, is_leaf=is_multi),
    )


def keep_last_good(ckpt_dir, good_step, saved_step, state, rng, record, grad_accum):
    """The checkpoint a stopped run resumes from. ``state`` is still that of ``good_step``
    (the steps after it were all discarded): saved as such, with ``record`` (a
    ``RunRecord``) as it stood there, unless a checkpoint of ``good_step`` or later (of
    the same state) exists."""
    if good_step <= saved_step or good_step == 0:
        return ckpt.latest_checkpoint(ckpt_dir)
    good = dataclasses.replace(
        record,
        data_position=good_step * grad_accum,
        skipped_steps=[s for s in record.skipped_steps if s <= good_step],
        nonfinite_streak=0,
    )
    return ckpt.save_checkpoint(ckpt_dir, good_step, {"state": state, "rng": rng}, good.to_meta())
