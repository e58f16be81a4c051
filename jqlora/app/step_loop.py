"""The steps of a fine-tuning run (see ``jqlora.app.loop``): each update over
``grad_accum`` micro-batches, a line of metrics.jsonl, the held-out loss every
``eval_every`` steps and a checkpoint every ``save_every``; a non-finite step stops the run
or is skipped (``on_nonfinite``)."""

from __future__ import annotations

import json
import time
from typing import IO, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jqlora import sharding
from jqlora.app import nonfinite
from jqlora.app.prepare import Run
from jqlora.app.report import format_loss
from jqlora.train import checkpoint as ckpt
from jqlora.train.step import TrainState


class _Update(NamedTuple):
    """One update's micro-batches, run."""

    state: TrainState
    loss: float  # mean over the micro-batches
    grad_norm: jax.Array  # of the last micro-batch
    tokens: int  # attended tokens in all
    targets: int  # tokens the loss counted
    compiled: bool  # a micro-batch had a shape not seen before: the step compiled first
    skipped: jax.Array  # non-finite: the state is still that of the step before
    micro_skipped: list[jax.Array]  # per micro-batch: it or one before it was non-finite


def train_steps(run: Run) -> tuple[TrainState, float | None]:
    """Steps ``run.start_step + 1`` to ``run.steps``, from ``run.state``; returns the
    state after the last and the held-out loss there (None: no held-out set).

    Raises ``NonFiniteLossError`` where a non-finite step stops the run, after saving the
    last good state as a checkpoint."""
    loop, record, steps = run.config.loop, run.record, run.steps
    state = run.state
    shapes_seen: set = set()
    last_eval = None
    saved_step = run.start_step  # the newest checkpoint of this run holds this step
    if run.start_step < steps:
        _log_compiling(run)
    bar = _progress(steps, run.start_step, run.config.output.progress)
    # Time left is estimated from steps that compiled nothing: a compiling step is many
    # times slower, and tqdm's own estimate would promise hours after the first step.
    fast_s, fast_steps = 0.0, 0
    with open(run.metrics_path, "a") as metrics_file:
        for step in range(run.start_step, steps):
            t0 = time.perf_counter()
            update = _run_update(run, state, step, shapes_seen, bar)
            state = update.state
            dt = time.perf_counter() - t0
            record.train_time_s += dt
            if not update.compiled:  # throughput of steps that did not compile a new shape
                record.timed_tokens += update.tokens
                record.timed_s += dt
                fast_s, fast_steps = fast_s + dt, fast_steps + 1
            done = step + 1
            state, line = _settle(run, update, done)
            # The schedule at this step (each skipped update before it delays the optimizer's).
            line.update(tokens=update.targets, tokens_per_s=update.tokens / dt, step_s=dt)
            if run.schedule is not None:
                line.update(lr=float(run.schedule(step)))
            streak = record.nonfinite_streak
            if streak and (
                loop.on_nonfinite == "stop" or streak >= nonfinite.MAX_CONSECUTIVE_NONFINITE
            ):
                _write_line(metrics_file, line)
                bar.close()
                kept = nonfinite.keep_last_good(
                    run.ckpt_dir, done - streak, saved_step, state, run.rng, record, loop.grad_accum
                )
                raise nonfinite.NonFiniteLossError(
                    done, line["reason"], streak, kept, loop.on_nonfinite
                )
            if streak:
                run.log(f"step {done}: {line['reason']}; its update was skipped")
            if run.eval_set and (done % loop.eval_every == 0 or done == steps):
                last_eval = run.eval_loss(state.lora)
                line["eval_loss"] = last_eval
            _write_line(metrics_file, line)
            run.loggers.log(done, line)
            bar.update(1)
            bar.set_postfix(
                {
                    "loss": f"{update.loss:.3f}",
                    "eval_loss": format_loss(last_eval),
                    "tok_s": f"{update.tokens / dt:.0f}",
                    "left": _time_left(steps - done, fast_s, fast_steps),
                }
            )
            if done % loop.save_every == 0 or done == steps:
                record.data_position = done * loop.grad_accum
                ckpt.save_checkpoint(
                    run.ckpt_dir, done, {"state": state, "rng": run.rng}, record.to_meta()
                )
                saved_step = done
    bar.close()
    if run.start_step >= steps:  # the checkpoint resumed from was the last
        last_eval = run.eval_loss(state.lora)
    return state, last_eval


def _run_update(run: Run, state: TrainState, step: int, shapes_seen: set, bar) -> _Update:
    """The ``grad_accum`` micro-batches of update ``step``; waits for them."""
    grad_accum = run.config.loop.grad_accum
    tokens, compiled, micro_losses, targets = 0, False, [], []
    skipped, micro_skipped = jnp.zeros((), jnp.bool_), []
    for j in range(grad_accum):
        micro = step * grad_accum + j
        batch = run.stream[micro]
        shape = batch["input_ids"].shape
        if run.device_mesh is not None:
            batch = sharding.shard_batch(batch, run.device_mesh)
        if shape not in shapes_seen:
            compiled = True
            bar.set_postfix_str(f"compiling the step for batch shape {tuple(shape)}")
        shapes_seen.add(shape)
        tokens += int(batch["attention_mask"].sum())
        # A non-finite micro-batch discards the rest of its accumulated update too.
        state, m = run.step_fn(
            state, run.params, batch, rng=jax.random.fold_in(run.rng, micro), skip=skipped
        )
        skipped = m["skipped"]
        micro_skipped.append(skipped)
        micro_losses.append(m["loss"])
        targets.append(m["tokens"])
    loss = float(np.mean([float(x) for x in micro_losses]))  # waits for the step
    return _Update(
        state=state,
        loss=loss,
        grad_norm=m["grad_norm"],
        tokens=tokens,
        targets=int(sum(float(t) for t in targets)),
        compiled=compiled,
        skipped=skipped,
        micro_skipped=micro_skipped,
    )


def _settle(run: Run, update: _Update, done: int) -> tuple[TrainState, dict[str, Any]]:
    """The state after step ``done`` and its metrics line so far: the loss and gradient
    norm, or for a skipped step ``skipped`` and the reason, with ``run.record``'s skipped
    steps and non-finite streak brought up to date."""
    record, state, grad_norm = run.record, update.state, float(update.grad_norm)
    line: dict[str, Any] = {"step": done}
    if bool(update.skipped):  # the state is still that of the step before
        if run.config.loop.grad_accum > 1:  # micro-batches before the bad one were accumulated
            applied = sum(not bool(x) for x in update.micro_skipped)
            state = nonfinite.undo_partial_accumulation(state, applied)
        record.skipped_steps.append(done)
        record.nonfinite_streak += 1
        line.update(skipped=True, reason=nonfinite.reason(update.loss, grad_norm))
    else:
        record.nonfinite_streak = 0
        line.update(loss=update.loss, grad_norm=grad_norm)
    return state, line


def _write_line(metrics_file: IO[str], line: dict[str, Any]) -> None:
    metrics_file.write(json.dumps(line) + "\n")
    metrics_file.flush()


def _log_compiling(run: Run) -> None:
    """Which steps run, and why the first ones are slow."""
    shapes = len(run.stream.buckets)
    run.log(
        f"training steps {run.start_step + 1}-{run.steps}: "
        + (
            "the first step compiles the train step first"
            if shapes == 1
            else f"the first step of each of the {shapes} batch shapes compiles first"
        )
        + ", so early steps are slower"
    )


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
    )


def _time_left(steps_left: int, seconds: float, steps: int) -> str:
    """``steps_left`` at the mean pace of ``steps`` (evaluations and checkpoints aside)."""
    from tqdm import tqdm

    if not steps_left:
        return "00:00"
    if not steps:
        return "?"
    return tqdm.format_interval(steps_left * seconds / steps)
