"""What a finished fine-tuning run leaves (see ``jqlora.app.loop``): the PEFT adapter,
loss.png, report.md, a summary in the log and the ``FinetuneResult``."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

from jqlora.app import report as report_lib
from jqlora.app.config import FinetuneConfig
from jqlora.app.prepare import Run
from jqlora.app.report import format_loss
from jqlora.train.step import TrainState, all_finite


@dataclasses.dataclass
class FinetuneResult:
    """What a finished run produced; ``lora`` is the trained adapter tree."""

    out: str
    model: str
    data: str
    steps: int
    batch_size: int
    grad_accum: int
    seq_len: int
    n_train: int
    n_eval: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    tokens_per_s: float
    train_time_s: float
    memory: dict
    sample_prompt: str | None
    sample_before: str | None
    sample_after: str | None
    lora: object = dataclasses.field(repr=False, default=None)
    skipped_steps: list[int] = dataclasses.field(default_factory=list)
    config: FinetuneConfig | None = None  # resolved: as in OUT/config.yaml


def finish_run(
    run: Run, state: TrainState, eval_loss_after: float | None, t_start: float
) -> FinetuneResult:
    """Samples the trained model, writes the adapter, loss.png and report.md into
    the run's output directory and logs a summary of the run begun at ``t_start``
    (``time.time()``)."""
    config, record, out = run.config, run.record, run.out
    lora = state.lora
    sample = config.output.sample
    sample_after = run.sample_answer(lora) if sample else None
    _save_adapter(out, lora, config.lora, config.model.path)
    result = FinetuneResult(
        out=out,
        model=config.model.path,
        data=str(config.data.path),  # resolved: the file read
        steps=run.steps,
        batch_size=config.data.batch_size,
        grad_accum=config.loop.grad_accum,
        seq_len=config.data.seq_len,
        n_train=len(run.train_set),
        n_eval=len(run.eval_set),
        eval_loss_before=record.eval_loss_before,
        eval_loss_after=eval_loss_after,
        tokens_per_s=record.timed_tokens / record.timed_s if record.timed_s else 0.0,
        train_time_s=record.train_time_s,
        memory=report_lib.peak_memory_bytes(),
        sample_prompt=run.tokenizer.decode(run.sample_ids) if sample else None,
        sample_before=record.sample_before,
        sample_after=sample_after,
        lora=lora,
        skipped_steps=list(record.skipped_steps),
        config=config,
    )
    run.loggers.close()
    report_lib.plot_loss(
        report_lib.read_metrics(run.metrics_path),
        os.path.join(out, "loss.png"),
        record.eval_loss_before,
    )
    text = report_lib.format_report(result)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    _log_summary(result, run.log, sample, t_start)
    return result


def _log_summary(result: FinetuneResult, log, sample: bool, t_start: float) -> None:
    log(
        f"eval loss: {format_loss(result.eval_loss_before)} before -> "
        f"{format_loss(result.eval_loss_after)} after"
    )
    if sample:
        log(f"sample before: {result.sample_before!r}\nsample after:  {result.sample_after!r}")
    if result.skipped_steps:
        log(f"skipped {len(result.skipped_steps)} non-finite steps: {result.skipped_steps}")
    log(
        f"{result.tokens_per_s:.0f} tokens/s, peak RSS {result.memory['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"{time.time() - t_start:.0f} s in all; adapter, loss.png and report.md in {result.out}"
    )


def _save_adapter(out: str, lora, lora_config, model: str) -> None:
    """The PEFT adapter files, written into a directory beside them and moved into ``out``:
    a killed or failed write leaves no partial adapter file."""
    from jqlora.hf import smollm2
    from jqlora.hf.peft import save_peft_adapter

    if not bool(all_finite(lora)):  # the train step never lets this happen; never write it
        raise RuntimeError(f"{out}: the trained adapter holds NaN or inf; not writing it")
    for leftover in os.listdir(out):  # of a run killed while writing its adapter
        if leftover.startswith(".tmp-adapter-"):
            shutil.rmtree(os.path.join(out, leftover), ignore_errors=True)
    tmp = os.path.join(out, f".tmp-adapter-{os.getpid()}")
    try:
        # PEFT loads the base named here: the default model's short name is jqlora's own.
        base_name = smollm2.HUB_NAME if model == smollm2.MODEL_NAME else model
        save_peft_adapter(tmp, lora, lora_config, base_model_name_or_path=base_name)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
