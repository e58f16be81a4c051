"""`finetune(config)`: a whole QLoRA run, from a model and a JSONL file to a PEFT adapter.

    load tokenizer + data -> load_hf (4-bit base) -> init_lora -> [eval, sample]
    -> steps (progress, metrics.jsonl, eval every N, checkpoint every N) -> [eval, sample]
    -> adapter_model.safetensors + adapter_config.json, loss.png, report.md

Everything a step depends on is a function of the run's configuration and the step index:
the batch (``BatchStream``), the dropout key (``fold_in(rng, micro_batch_index)``) and the
state (restored bit for bit from a checkpoint). So a run interrupted and resumed with
``resume`` computes exactly what the uninterrupted run computes.

Output directory::

    OUT/config.yaml               every option of the run, resolved (`jqlora.app.config`);
                                  ``jqlora finetune --config OUT/config.yaml`` repeats it
    OUT/metrics.jsonl             one line per step: step, loss, grad_norm, tokens_per_s, lr,
                                  [eval_loss]; a skipped non-finite step: skipped, reason
    OUT/checkpoints/step_*/       LoRA + optimizer state + data position + rng (atomic)
    OUT/adapter_model.safetensors, OUT/adapter_config.json   the PEFT adapter
    OUT/loss.png, OUT/report.md

The pieces: ``jqlora.app.prepare`` (data, model, optimizer, fresh start or resume),
``jqlora.app.step_loop`` (the steps) and ``jqlora.app.outputs`` (adapter, plot, report,
result).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optax

from jqlora.app.config import FinetuneConfig
from jqlora.app.nonfinite import NonFiniteLossError
from jqlora.app.outputs import FinetuneResult, finish_run
from jqlora.app.prepare import prepare_run
from jqlora.app.step_loop import train_steps

__all__ = ["FinetuneConfig", "FinetuneResult", "NonFiniteLossError", "finetune"]


def finetune(
    config: FinetuneConfig | None = None,
    optimizer: optax.GradientTransformation | None = None,
    *,
    log: Callable[[str], object] = print,
    **options,
) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` with QLoRA; write the adapter, metrics,
    checkpoints and report to ``config.output.dir``.

    config: the run's settings (default: ``FinetuneConfig()``, the SmolLM2 house-style run).
    optimizer: an optax optimizer for the adapters in place of ``config.optim``'s AdamW
      (its learning rate is then the optimizer's own; metrics.jsonl logs none). It is still
      accumulated over ``loop.grad_accum`` micro-batches and offloaded with
      ``optim.offload``. A resumed run must be given the same one.
    options: options by key, over ``config`` (``finetune(steps=5, lora_r=4)``); the keys
      are those of ``jqlora finetune``'s flags and config.yaml (``FinetuneConfig.replace``).

    ``loop.steps`` or ``loop.epochs`` (not both) sets the length; neither: 40 updates.
    ``loop.resume`` continues from the newest checkpoint in ``OUT/checkpoints`` after
    checking that the settings a resumed run must keep equal ``OUT/config.yaml``'s.
    ``loop.mesh`` (e.g. ``{"data": 2, "fsdp": 4}``, see ``jqlora.sharding``) places the
    base, adapters, optimizer state and batches on the devices of this process.

    A step whose loss, gradients or update hold NaN or inf never changes the adapters or
    the optimizer state. ``on_nonfinite="stop"`` (default) then ends the run with
    ``NonFiniteLossError`` naming the step, after saving the last good state as a
    checkpoint (no adapter is written); ``"skip"`` discards that step's update, logs it in
    metrics.jsonl (``"skipped": true`` and the reason, in place of the loss) and goes on,
    stopping all the same after ``nonfinite.MAX_CONSECUTIVE_NONFINITE`` (5) in a row.
    """
    config = (config or FinetuneConfig()).replace(**options)
    t_start = time.time()
    run = prepare_run(config, optimizer, log)
    state, eval_loss_after = train_steps(run)
    return finish_run(run, state, eval_loss_after, t_start)
