"""What a fine-tuning run sets up before its first step (see ``jqlora.train.loop``).

``prepare_run`` loads the tokenizer and the data, the base model (4-bit unless asked otherwise) and fresh adapters,
builds the optimizer and the jitted train and eval programs, and then either restores the
newest checkpoint (``resume=True``) or measures the base model (eval loss, a sample answer)
and starts ``metrics.jsonl`` afresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jqlora import sharding
from jqlora.lora import LoraConfig, init_lora
from jqlora.train import checkpoint as ckpt
from jqlora.train import data as data_lib
from jqlora.train import report as report_lib
from jqlora.train.run_args import (
    FinetuneArgs,
    checkpoint_to_resume,
    checkpointed_args,
    default_data_path,
    resolve_model_path,
    total_steps,
)
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
class Run:
    """A run set up to train: its settings resolved, its data, model and programs, and
    where it starts (``start_step``, ``state``, ``rng``, ``meta``), fresh or restored."""

    args: FinetuneArgs
    data: str  # the data file: ``args.data`` or the house-style set
    steps: int  # updates in all, from ``args.steps`` or ``args.epochs``
    warmup_steps: int
    compute_dtype: np.dtype
    lora_config: LoraConfig
    run_args: dict[str, Any]  # saved in each checkpoint; a resume must agree on _RESUME_KEYS
    tokenizer: Any
    pad_id: int
    train_set: list[data_lib.Example]
    eval_set: list[data_lib.Example]
    stream: data_lib.BatchStream
    device_mesh: Any  # None: one device
    base: Any  # the model
    params: Any  # its frozen (quantized) weights
    step_fn: Callable[..., Any]
    eval_fn: Callable[..., Any]
    sample_ids: np.ndarray | None  # the prompt of the sample answers; None: no samples
    state: TrainState
    rng: jax.Array  # dropout key; micro-batch i uses fold_in(rng, i)
    start_step: int = 0
    # Saved with each checkpoint besides the state: eval loss and sample before training,
    # timings, skipped steps, the data position and ``run_args``.
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.args.out, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.args.out, "metrics.jsonl")

    def eval_loss(self, lora) -> float | None:
        """Mean next-token loss of the adapted model on the held-out set (None: no such set)."""
        a = self.args
        return evaluate_loss(
            self.eval_fn, lora, self.params, self.eval_set, a.batch_size, a.seq_len, self.pad_id
        )

    def sample_answer(self, lora) -> str:
        """The adapted model's greedy answer to the sample prompt."""
        return report_lib.sample_answer(
            self.base,
            self.params,
            lora,
            self.tokenizer,
            self.sample_ids,
            max_new_tokens=self.args.max_new_tokens,
        )


def make_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps`` updates, then constant (QLoRA)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, warmup_steps)


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


def prepare_run(args: FinetuneArgs) -> Run:
    """Data, base model, adapters, optimizer and programs of a run, at its first step or at
    the newest checkpoint's (``args.resume``). Raises ``ValueError`` where ``args.out``
    holds checkpoints and ``resume`` is off, or their settings differ from ``args``."""
    log = args.log
    data = args.data or default_data_path()
    path = resolve_model_path(args.model)
    log(f"model: {path} ({'float' if args.quant == 'none' else args.quant + ' + double quant'})")
    compute_dtype = jnp.dtype(args.compute_dtype or default_compute_dtype())
    lora_config = LoraConfig(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.target_modules,
    )

    tokenizer = data_lib.load_tokenizer(path)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    examples, stats = data_lib.load_examples(data, tokenizer, args.seq_len)
    train_set, eval_set = data_lib.split_eval(examples, args.eval_fraction, args.seed)
    stream = data_lib.BatchStream(train_set, args.batch_size, args.seq_len, pad_id, args.seed)
    steps = total_steps(args, stream)
    warmup_steps = max(1, round(0.03 * steps)) if args.warmup_steps is None else args.warmup_steps
    run_args = checkpointed_args(args, data, warmup_steps, compute_dtype)
    latest = checkpoint_to_resume(args, run_args)
    log(
        f"data: {data}: {len(train_set)} train / {len(eval_set)} held-out examples"
        + (
            f" ({stats['truncated']} truncated to {args.seq_len} tokens)"
            if stats["truncated"]
            else ""
        )
        + (f" ({stats['dropped']} without a target dropped)" if stats["dropped"] else "")
    )

    device_mesh = _make_mesh(args)
    place = None if device_mesh is None else sharding.placer(device_mesh)
    base, params = _load_base(path, args.quant, args.progress, place=place)
    lora = init_lora(jax.random.key(args.seed), params, lora_config)
    optimizer = _make_optimizer(args, warmup_steps)
    state = init_train_state(lora, optimizer)
    if device_mesh is not None:
        state, params = sharding.shard_train_state(state, params, device_mesh)
    step_fn = make_train_step(
        base,
        optimizer,
        compute_dtype=compute_dtype,
        remat="nothing_saveable" if args.remat else None,
        scan_layers=args.scan_layers,
        skip_nonfinite=True,
    )
    run = Run(
        args=args,
        data=data,
        steps=steps,
        warmup_steps=warmup_steps,
        compute_dtype=compute_dtype,
        lora_config=lora_config,
        run_args=run_args,
        tokenizer=tokenizer,
        pad_id=pad_id,
        train_set=train_set,
        eval_set=eval_set,
        stream=stream,
        device_mesh=device_mesh,
        base=base,
        params=params,
        step_fn=step_fn,
        eval_fn=make_eval_fn(base, compute_dtype, scan_layers=args.scan_layers),
        sample_ids=_prompt_of(eval_set[0] if eval_set else train_set[0]) if args.sample else None,
        state=state,
        rng=jax.random.key(args.seed + 1),
    )
    if latest:
        _resume(run, latest)
    else:
        _start(run)
    run.meta["args"] = run_args
    run.meta.setdefault("skipped_steps", [])
    run.meta.setdefault("nonfinite_streak", 0)
    return run


def _make_mesh(args: FinetuneArgs):
    """The device mesh of ``args.mesh`` (None: one device), checked against the batch size."""
    if args.mesh is None:
        return None
    device_mesh = sharding.make_mesh(args.mesh)
    if args.batch_size % sharding.batch_shards(device_mesh):
        raise ValueError(
            f"batch_size {args.batch_size} does not divide over the batch axes of mesh "
            f"{dict(device_mesh.shape)}"
        )
    args.log(f"mesh: {dict(device_mesh.shape)}")
    return device_mesh


def _load_base(path: str, quant: str, progress: bool, place=None):
    """``(model, params)`` of the base model, 4-bit unless ``quant == "none"``; ``place``
    puts each tensor onto its shards as it loads (``jqlora.sharding.placer``)."""
    from jqlora import QuantConfig, load_hf

    quantization = None if quant == "none" else QuantConfig(quant_type=quant, double_quant=True)
    return load_hf(
        path,
        quantization=quantization,
        dtype=jnp.float32,
        progress=None if progress else False,
        place=place,
    )


def _make_optimizer(args: FinetuneArgs, warmup_steps: int) -> optax.GradientTransformation:
    """AdamW on the schedule with clipping; accumulated over ``grad_accum`` micro-batches
    and its state kept in host memory where asked."""
    optimizer = make_optimizer(
        make_schedule(args.lr, warmup_steps), max_grad_norm=args.max_grad_norm
    )
    if args.grad_accum > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=args.grad_accum)
    if args.offload_optimizer:
        from jqlora.train.offload import offload

        optimizer = offload(optimizer)
    return optimizer


def _prompt_of(example: data_lib.Example) -> np.ndarray:
    """The tokens before the first loss token: the prompt a sample answer continues."""
    first = int(np.argmax(example.loss_mask[1:] > 0)) + 1
    return example.input_ids[:first]


def _resume(run: Run, latest: str) -> None:
    """``run`` at the step, state, dropout key and meta of checkpoint ``latest``;
    metrics.jsonl cut back to that step."""
    restored, run.start_step, run.meta = ckpt.restore_checkpoint(
        latest, {"state": run.state, "rng": run.rng}
    )
    run.state, run.rng = restored["state"], restored["rng"]
    if run.device_mesh is not None:
        run.state, run.params = sharding.shard_train_state(run.state, run.params, run.device_mesh)
    _truncate_metrics(run.metrics_path, run.start_step)
    run.args.log(f"resuming from {latest} (step {run.start_step})")


def _start(run: Run) -> None:
    """An empty metrics.jsonl, and the base model's eval loss and sample answer in
    ``run.meta`` for the report."""
    args = run.args
    os.makedirs(args.out, exist_ok=True)
    open(run.metrics_path, "w").close()
    first = [f"evaluating the base model on {len(run.eval_set)} held-out examples"]
    first = first * bool(run.eval_set) + ["sampling an answer"] * args.sample
    if first:
        args.log(
            " and ".join(first) + " (XLA compiles these programs first; later calls reuse them)"
        )
    lora = run.state.lora
    run.meta = {
        "eval_loss_before": run.eval_loss(lora),
        "sample_before": None,
        "train_time_s": 0.0,
        "timed_tokens": 0,
        "timed_s": 0.0,
    }
    if args.sample:
        # B = 0 at init: the adapted model is the base model, and the program is the one
        # the sample after training reuses (one compilation instead of two).
        run.meta["sample_before"] = run.sample_answer(lora)
    args.log(f"eval loss before: {report_lib.format_loss(run.meta['eval_loss_before'])}")


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
