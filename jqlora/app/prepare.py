"""What a fine-tuning run sets up before its first step (see ``jqlora.app.loop``).

``prepare_run`` loads the tokenizer and the data, the base model (4-bit unless asked
otherwise) and fresh adapters, builds the learning-rate schedule, the optimizer and the
jitted train and eval programs, writes ``OUT/config.yaml`` and then either restores the
newest checkpoint (``resume``) or measures the base model (eval loss, a sample answer)
and starts ``metrics.jsonl`` afresh.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jqlora import sharding
from jqlora.app import config_io
from jqlora.app import report as report_lib
from jqlora.app.config import FinetuneConfig
from jqlora.app.loggers import Loggers, make_loggers
from jqlora.app.run_args import (
    checkpoint_to_resume,
    default_data_path,
    resolve,
    resolve_model_path,
    total_steps,
)
from jqlora.hf.load import load_hf
from jqlora.lora import init_lora
from jqlora.train import checkpoint as ckpt
from jqlora.train import data as data_lib
from jqlora.train.packing import PackedStream
from jqlora.train.schedules import make_schedule
from jqlora.train.step import (
    TrainState,
    configure_model,
    default_compute_dtype,
    init_train_state,
    loss_fn,
    make_optimizer,
    make_train_step,
)


@dataclasses.dataclass
class RunRecord:
    """What a run has measured and counted so far; saved with each checkpoint beside the
    state, so that a resumed run reports as the uninterrupted one would."""

    eval_loss_before: float | None = None
    sample_before: str | None = None
    train_time_s: float = 0.0
    timed_tokens: int = 0  # tokens and seconds of the steps that compiled nothing
    timed_s: float = 0.0
    skipped_steps: list[int] = dataclasses.field(default_factory=list)
    nonfinite_streak: int = 0  # non-finite steps in a row, up to the last one
    data_position: int = 0  # micro-batches consumed

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Run:
    """A run set up to train: its settings resolved, its data, model and programs, and
    where it starts (``start_step``, ``state``, ``rng``, ``record``), fresh or restored."""

    config: FinetuneConfig  # resolved: as in OUT/config.yaml
    steps: int  # updates in all, from ``loop.steps`` or ``loop.epochs``
    schedule: optax.Schedule | None  # the learning rate per update; None: the caller's optimizer
    tokenizer: Any
    pad_id: int
    train_set: list[data_lib.Example]
    eval_set: list[data_lib.Example]
    stream: Any  # data_lib.BatchStream, or packing.PackedStream
    device_mesh: Any  # None: one device
    base: Any  # the model
    params: Any  # its frozen (quantized) weights
    step_fn: Callable[..., Any]
    eval_fn: Callable[..., Any]
    sample_ids: np.ndarray | None  # the prompt of the sample answers; None: no samples
    state: TrainState
    rng: jax.Array  # dropout key; micro-batch i uses fold_in(rng, i)
    start_step: int
    record: RunRecord
    log: Callable[[str], object]
    loggers: Loggers = dataclasses.field(default_factory=Loggers)  # --report-to

    @property
    def out(self) -> str:
        return self.config.output.dir

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")

    def eval_loss(self, lora) -> float | None:
        """Mean next-token loss of the adapted model on the held-out set (None: no such set)."""
        d = self.config.data
        return evaluate_loss(
            self.eval_fn, lora, self.params, self.eval_set, d.batch_size, d.seq_len, self.pad_id
        )

    def sample_answer(self, lora) -> str:
        """The adapted model's greedy answer to the sample prompt."""
        return report_lib.sample_answer(
            self.base,
            self.params,
            lora,
            self.tokenizer,
            self.sample_ids,
            max_new_tokens=self.config.output.max_new_tokens,
        )


def make_eval_fn(model, compute_dtype, *, scan_layers: bool | None = None):
    """A jitted ``(lora, params, batch) -> (sum of target losses, number of targets)``."""
    model = configure_model(model, compute_dtype=compute_dtype, scan_layers=scan_layers)

    @jax.jit
    def evaluate(lora, params, batch):
        loss, aux = loss_fn(lora, params, batch, model=model, compute_dtype=compute_dtype)
        return loss * aux["tokens"], aux["tokens"]

    return evaluate


def evaluate_loss(eval_fn, lora, params, examples, batch_size, seq_len, pad_id) -> float | None:
    """Mean next-token loss over every target token of the held-out set."""
    if not examples:
        return None
    total, count = 0.0, 0.0
    for batch in data_lib.eval_batches(examples, batch_size, seq_len, pad_id):
        s, n = eval_fn(lora, params, batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def prepare_run(
    config: FinetuneConfig,
    optimizer: optax.GradientTransformation | None = None,
    log: Callable[[str], object] = print,
) -> Run:
    """Data, base model, adapters, optimizer and programs of a run, at its first step or at
    the newest checkpoint's (``config.loop.resume``). ``optimizer`` replaces the one
    ``config.optim`` describes. Raises ``ValueError`` where the output directory holds
    checkpoints and ``resume`` is off, or their run's settings differ from ``config``."""
    m, d, loop, out = config.model, config.data, config.loop, config.output
    data = d.path or default_data_path()
    path = resolve_model_path(m.path)
    q = config.quant
    log(
        f"model: {path} ({'float' if q is None else q.quant_type + ' + double quant' * q.double_quant})"
    )
    compute_dtype = jnp.dtype(m.compute_dtype or default_compute_dtype())

    tokenizer = data_lib.load_tokenizer(path)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    examples, stats = data_lib.load_examples(data, tokenizer, d.seq_len)
    if d.eval_data is None:
        train_set, eval_set = data_lib.split_eval(examples, d.eval_fraction, loop.seed)
    else:
        train_set, (eval_set, _) = (
            examples,
            data_lib.load_examples(d.eval_data, tokenizer, d.seq_len),
        )
    stream: Any = (PackedStream if d.packing else data_lib.BatchStream)(
        train_set, d.batch_size, d.seq_len, pad_id, loop.seed
    )
    steps = total_steps(loop, stream)
    config = resolve(config, data, steps, compute_dtype)
    latest = checkpoint_to_resume(config)
    log(
        f"data: {data}: {len(train_set)} train / {len(eval_set)} held-out examples"
        + (f" (held out: {d.eval_data})" if d.eval_data else "")
        + (f" packed into {len(stream.rows)} rows" if d.packing else "")
        + (f" ({stats['truncated']} truncated to {d.seq_len} tokens)" if stats["truncated"] else "")
        + (f" ({stats['dropped']} without a target dropped)" if stats["dropped"] else "")
    )

    device_mesh = _make_mesh(config, log)
    place = None if device_mesh is None else sharding.placer(device_mesh)
    base, params = load_hf(
        path, quantization=q, dtype=jnp.float32, progress=None if out.progress else False,
        place=place,
    )  # fmt: skip
    backbone = type(base).BACKBONE
    if d.packing and "segment_ids" not in inspect.signature(backbone.__call__).parameters:
        raise ValueError(f"--packing: {type(base).__name__} takes no segment_ids (packed examples)")
    lora = init_lora(jax.random.key(loop.seed), params, config.lora)
    schedule = None
    if optimizer is None:
        schedule, optimizer = make_recipe(config, steps)
    optimizer = _accumulate_and_place(optimizer, config)
    state = init_train_state(lora, optimizer)
    if device_mesh is not None:
        state, params = sharding.shard_train_state(state, params, device_mesh)
    step_fn = make_train_step(
        base,
        optimizer,
        compute_dtype=compute_dtype,
        remat="nothing_saveable" if m.remat else None,
        scan_layers=m.scan_layers,
        skip_nonfinite=True,
    )
    os.makedirs(out.dir, exist_ok=True)
    config_io.write_file(config, os.path.join(out.dir, config_io.CONFIG_FILE))
    run = Run(
        config=config,
        steps=steps,
        schedule=schedule,
        tokenizer=tokenizer,
        pad_id=pad_id,
        train_set=train_set,
        eval_set=eval_set,
        stream=stream,
        device_mesh=device_mesh,
        base=base,
        params=params,
        step_fn=step_fn,
        eval_fn=make_eval_fn(base, compute_dtype, scan_layers=m.scan_layers),
        sample_ids=_prompt_of(eval_set[0] if eval_set else train_set[0]) if out.sample else None,
        state=state,
        rng=jax.random.key(loop.seed + 1),
        start_step=0,
        record=RunRecord(),
        log=log,
        loggers=make_loggers(out.report_to.split(","), out.dir, config.to_dict()),
    )
    return _resume(run, latest) if latest else _start(run)


def make_recipe(
    config: FinetuneConfig, steps: int
) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule and the optimizer of ``config`` (resolved) for ``steps``."""
    o, s = config.optim, config.schedule
    assert s.warmup_steps is not None  # resolved
    schedule = make_schedule(s.lr_scheduler, o.lr, steps, s.warmup_steps, s.min_lr_ratio)
    optimizer = make_optimizer(
        schedule,
        name=o.optimizer,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        b1=o.adam_beta1,
        b2=o.adam_beta2,
        eps=o.adam_epsilon,
    )
    return schedule, optimizer


def _make_mesh(config: FinetuneConfig, log):
    """The device mesh of ``loop.mesh`` (None: one device), checked against the batch size."""
    if config.loop.mesh is None:
        return None
    device_mesh = sharding.make_mesh(config.loop.mesh)
    batch_size = config.data.batch_size
    if batch_size % sharding.batch_shards(device_mesh):
        raise ValueError(
            f"batch_size {batch_size} does not divide over the batch axes of mesh "
            f"{dict(device_mesh.shape)}"
        )
    log(f"mesh: {dict(device_mesh.shape)}")
    return device_mesh


def _accumulate_and_place(
    optimizer: optax.GradientTransformation, config: FinetuneConfig
) -> optax.GradientTransformation:
    """``optimizer`` accumulated over ``grad_accum`` micro-batches, and its state kept in
    host memory where asked."""
    if config.loop.grad_accum > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.loop.grad_accum)
    if config.optim.offload:
        from jqlora.train.offload import offload

        optimizer = offload(optimizer)
    return optimizer


def _prompt_of(example: data_lib.Example) -> np.ndarray:
    """The tokens before the first loss token: the prompt a sample answer continues."""
    first = int(np.argmax(example.loss_mask[1:] > 0)) + 1
    return example.input_ids[:first]


def _resume(run: Run, latest: str) -> Run:
    """``run`` at the step, state, dropout key and record of checkpoint ``latest``;
    metrics.jsonl cut back to that step."""
    restored, start_step, meta = ckpt.restore_checkpoint(
        latest, {"state": run.state, "rng": run.rng}
    )
    state, params = restored["state"], run.params
    if run.device_mesh is not None:
        state, params = sharding.shard_train_state(state, params, run.device_mesh)
    _truncate_metrics(run.metrics_path, start_step)
    run.log(f"resuming from {latest} (step {start_step})")
    return dataclasses.replace(
        run,
        state=state,
        params=params,
        rng=restored["rng"],
        start_step=start_step,
        record=RunRecord.from_meta(meta),
    )


def _start(run: Run) -> Run:
    """An empty metrics.jsonl, and the base model's eval loss and sample answer in
    ``run.record`` for the report."""
    sample = run.config.output.sample
    open(run.metrics_path, "w").close()
    first = [f"evaluating the base model on {len(run.eval_set)} held-out examples"]
    first = first * bool(run.eval_set) + ["sampling an answer"] * sample
    if first:
        run.log(
            " and ".join(first) + " (XLA compiles these programs first; later calls reuse them)"
        )
    lora = run.state.lora
    record = run.record
    record.eval_loss_before = run.eval_loss(lora)
    if sample:
        # B = 0 at init: the adapted model is the base model, and the program is the one
        # the sample after training reuses (one compilation instead of two).
        record.sample_before = run.sample_answer(lora)
    run.loggers.log(0, {"eval_loss": record.eval_loss_before})
    run.log(f"eval loss before: {report_lib.format_loss(record.eval_loss_before)}")
    return run


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past ``step`` (the resumed run writes them again, identically) and
    a last line a kill cut short. The file is replaced whole, so a kill here loses nothing."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [
                line
                for line in f
                if line.endswith("\n") and line.strip() and json.loads(line)["step"] <= step
            ]
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
