"""`finetune(...)`: a whole QLoRA run, from a model and a JSONL file to a PEFT adapter.

    load tokenizer + data -> load_hf (4-bit base) -> init_lora -> [eval, sample]
    -> steps (progress, metrics.jsonl, eval every N, checkpoint every N) -> [eval, sample]
    -> adapter_model.safetensors + adapter_config.json, loss.png, report.md

Everything a step depends on is a function of the run's arguments and the step index: the
batch (``BatchStream``), the dropout key (``fold_in(rng, micro_batch_index)``) and the
state (restored bit for bit from a checkpoint). So a run interrupted and resumed with
``resume=True`` computes exactly what the uninterrupted run computes.

Output directory::

    OUT/metrics.jsonl             one line per step: step, loss, grad_norm, tokens_per_s, lr,
                                  [eval_loss]; a skipped non-finite step: skipped, reason
    OUT/checkpoints/step_*/       LoRA + optimizer state + data position + rng (atomic)
    OUT/adapter_model.safetensors, OUT/adapter_config.json   the PEFT adapter
    OUT/loss.png, OUT/report.md

The pieces: ``jqlora.train.prepare`` (arguments, data, model, optimizer, fresh start or
resume), ``jqlora.train.step_loop`` (the steps) and ``jqlora.train.outputs`` (adapter,
plot, report, result).
"""

from __future__ import annotations

import time

from jqlora.train.nonfinite import NonFiniteLossError
from jqlora.train.outputs import FinetuneResult, finish_run
from jqlora.train.outputs import _save_adapter as _save_adapter  # noqa: F401  (tests import it)
from jqlora.train.prepare import make_schedule, prepare_run
from jqlora.train.run_args import (
    DEFAULT_MODEL,
    DEFAULT_OUT,
    DEFAULT_STEPS,
    FinetuneArgs,
    check_args,
    default_data_path,
    resolve_model_path,
)
from jqlora.train.step_loop import train_steps

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_OUT",
    "DEFAULT_STEPS",
    "FinetuneResult",
    "NonFiniteLossError",
    "default_data_path",
    "finetune",
    "make_schedule",
    "resolve_model_path",
]


def finetune(
    model: str = DEFAULT_MODEL,
    data: str | None = None,
    out: str = DEFAULT_OUT,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    seq_len: int = 128,
    lr: float = 2e-4,
    lora_r: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.05,
    target_modules="all-linear",
    quant: str = "nf4",
    offload_optimizer: bool = False,
    remat: bool = False,
    scan_layers: bool = False,
    eval_every: int = 20,
    save_every: int = 20,
    resume: bool = False,
    seed: int = 0,
    warmup_steps: int | None = None,
    eval_fraction: float = 0.1,
    max_grad_norm: float = 0.3,
    compute_dtype=None,
    mesh=None,
    on_nonfinite: str = "stop",
    sample: bool = True,
    max_new_tokens: int = 40,
    progress: bool = True,
    log=print,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with QLoRA and write the adapter to ``out``.

    Defaults are QLoRA's recipe (NF4 with double quantization, adapters on every linear
    layer, AdamW at 2e-4, gradient norm clipped to 0.3, constant learning rate after a
    warm-up of 3 % of the steps) at a size that suits the default 135M-parameter model.
    ``steps`` or ``epochs`` (not both) sets the length; neither: DEFAULT_STEPS (40). ``resume=True``
    continues from the newest checkpoint in ``out/checkpoints``. ``mesh`` (e.g.
    ``"data=2,fsdp=4"``, see ``jqlora.sharding``) places the base, adapters, optimizer state
    and batches on the devices of this process; default: one device. ``remat=True``
    recomputes each decoder layer in the backward pass; ``scan_layers=True`` runs the layers
    as one loop, so XLA compiles one layer instead of all of them (on a CPU each step is
    slower; with ``remat`` the step needs far less memory: ``jqlora.models.layer_list.LayerList``).

    A step whose loss, gradients or update hold NaN or inf never changes the adapters or
    the optimizer state. ``on_nonfinite="stop"`` (default) then ends the run with
    ``NonFiniteLossError`` naming the step, after saving the last good state as a
    checkpoint (no adapter is written); ``"skip"`` discards that step's update, logs it in
    metrics.jsonl (``"skipped": true`` and the reason, in place of the loss) and goes on,
    stopping all the same after ``nonfinite.MAX_CONSECUTIVE_NONFINITE`` (5) in a row.
    """
    args = FinetuneArgs(**locals())  # every parameter above, by name
    t_start = time.time()
    check_args(args)
    run = prepare_run(args)
    state, eval_loss_after = train_steps(run)
    return finish_run(run, state, eval_loss_after, t_start)
