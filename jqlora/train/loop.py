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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jqlora.train import checkpoint as ckpt
from jqlora.train import data as data_lib
from jqlora.train import nonfinite
from jqlora.train import report as report_lib
from jqlora.train.nonfinite import NonFiniteLossError  # noqa: F401  (raised by finetune)
from jqlora.train.step import (
    all_finite,
    configure_model,
    default_compute_dtype,
    init_train_state,
    loss_fn,
    make_optimizer,
    make_train_step,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_STEPS = 40  # the house style has taken by then on SmolLM2-135M (eval loss 2.90 -> 0.36)
DEFAULT_OUT = os.path.join("runs", "smollm2-house-style")
# Arguments that must agree between a run and the checkpoint it resumes from.
_RESUME_KEYS = (
    "model",
    "data",
    "batch_size",
    "grad_accum",
    "seq_len",
    "lr",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "quant",
    "offload_optimizer",
    "remat",
    "seed",
    "warmup_steps",
    "eval_fraction",
    "max_grad_norm",
    "compute_dtype",
)


def default_data_path() -> str:
    """The house-style instruction set shipped with jqlora (see scripts/make_house_style_data.py)."""
    return str(resources.files("jqlora") / "data" / "house_style.jsonl")


def resolve_model_path(model: str) -> str:
    """A model directory, a ``.gguf`` file, or the name of a model jqlora knows how to find."""
    if model.lower() == DEFAULT_MODEL:
        from jqlora.hf.smollm2 import smollm2_gguf_path

        return str(smollm2_gguf_path(fetch=True))
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"model {model!r}: no such directory or file (or use {DEFAULT_MODEL!r})"
        )
    return model


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


def make_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps`` updates, then constant (QLoRA)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, warmup_steps)


def make_eval_fn(model, compute_dtype):
    """A jitted ``(lora, params, batch) -> (sum of target losses, number of targets)``."""
    model = configure_model(model, compute_dtype=compute_dtype)

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


def _prompt_of(example: data_lib.Example) -> np.ndarray:
    """The tokens before the first loss token: the prompt a sample answer continues."""
    first = int(np.argmax(example.loss_mask[1:] > 0)) + 1
    return example.input_ids[:first]


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
    and batches on the devices of this process; default: one device.

    A step whose loss, gradients or update hold NaN or inf never changes the adapters or
    the optimizer state. ``on_nonfinite="stop"`` (default) then ends the run with
    ``NonFiniteLossError`` naming the step, after saving the last good state as a
    checkpoint (no adapter is written); ``"skip"`` discards that step's update, logs it in
    metrics.jsonl (``"skipped": true`` and the reason, in place of the loss) and goes on,
    stopping all the same after ``nonfinite.MAX_CONSECUTIVE_NONFINITE`` (5) in a row.
    """
    from jqlora.lora import LoraConfig, init_lora

    t_start = time.time()
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    for name, v in (
        ("batch_size", batch_size),
        ("grad_accum", grad_accum),
        ("eval_every", eval_every),
        ("save_every", save_every),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for name, x in (("lr", lr), ("epochs", epochs), ("max_grad_norm", max_grad_norm)):
        if x is not None and not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    if quant not in ("nf4", "fp4", "none"):
        raise ValueError(f"quant must be nf4, fp4 or none, got {quant!r}")
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    data = data or default_data_path()
    path = resolve_model_path(model)
    log(f"model: {path} ({'float' if quant == 'none' else quant + ' + double quant'})")
    compute_dtype = jnp.dtype(compute_dtype or default_compute_dtype())
    lora_config = LoraConfig(
        r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target_modules
    )

    tokenizer = data_lib.load_tokenizer(path)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    examples, stats = data_lib.load_examples(data, tokenizer, seq_len)
    train_set, eval_set = data_lib.split_eval(examples, eval_fraction, seed)
    stream = data_lib.BatchStream(train_set, batch_size, seq_len, pad_id, seed)
    updates_per_epoch = -(-stream.batches_per_epoch // grad_accum)
    if steps is None:
        steps = max(1, round(epochs * updates_per_epoch)) if epochs is not None else DEFAULT_STEPS
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    warmup_steps = max(1, round(0.03 * steps)) if warmup_steps is None else warmup_steps
    run_args = dict(
        model=model,
        data=os.path.abspath(data),
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        lr=lr,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        quant=quant,
        offload_optimizer=offload_optimizer,
        remat=remat,
        seed=seed,
        warmup_steps=warmup_steps,
        eval_fraction=eval_fraction,
        max_grad_norm=max_grad_norm,
        compute_dtype=compute_dtype.name,
    )
    ckpt_dir = os.path.join(out, "checkpoints")
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if latest and not resume:
        raise ValueError(
            f"{out} already holds checkpoints of a run; pass resume=True (--resume) or another output directory"
        )
    if latest and resume:
        saved = ckpt.read_meta(latest)["args"]
        diff = {k: (saved.get(k), run_args[k]) for k in _RESUME_KEYS if saved.get(k) != run_args[k]}
        if diff:
            raise ValueError(
                f"{latest}: cannot resume with different settings (saved, now): {diff}"
            )
    log(
        f"data: {data}: {len(train_set)} train / {len(eval_set)} held-out examples"
        + (f" ({stats['truncated']} truncated to {seq_len} tokens)" if stats["truncated"] else "")
        + (f" ({stats['dropped']} without a target dropped)" if stats["dropped"] else "")
    )

    device_mesh = None
    if mesh is not None:
        from jqlora import sharding

        device_mesh = sharding.make_mesh(mesh)
        if batch_size % sharding.batch_shards(device_mesh):
            raise ValueError(
                f"batch_size {batch_size} does not divide over the batch axes of mesh "
                f"{dict(device_mesh.shape)}"
            )
        log(f"mesh: {dict(device_mesh.shape)}")
    base, params = _load_base(
        path, quant, progress, place=None if device_mesh is None else sharding.placer(device_mesh)
    )
    lora = init_lora(jax.random.key(seed), params, lora_config)
    optimizer = make_optimizer(make_schedule(lr, warmup_steps), max_grad_norm=max_grad_norm)
    if grad_accum > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=grad_accum)
    if offload_optimizer:
        from jqlora.train.offload import offload

        optimizer = offload(optimizer)
    state = init_train_state(lora, optimizer)
    if device_mesh is not None:
        state, params = sharding.shard_train_state(state, params, device_mesh)
        lora = state.lora
    rng = jax.random.key(seed + 1)
    step_fn = make_train_step(
        base,
        optimizer,
        compute_dtype=compute_dtype,
        remat="nothing_saveable" if remat else None,
        skip_nonfinite=True,
    )
    eval_fn = make_eval_fn(base, compute_dtype)
    sample_ids = _prompt_of(eval_set[0] if eval_set else train_set[0]) if sample else None

    start_step = 0
    meta: dict[str, Any] = {}
    metrics_path = os.path.join(out, "metrics.jsonl")
    if latest and resume:
        restored, start_step, meta = ckpt.restore_checkpoint(latest, {"state": state, "rng": rng})
        state, rng = restored["state"], restored["rng"]
        if device_mesh is not None:
            state, params = sharding.shard_train_state(state, params, device_mesh)
        _truncate_metrics(metrics_path, start_step)
        log(f"resuming from {latest} (step {start_step})")
    else:
        os.makedirs(out, exist_ok=True)
        open(metrics_path, "w").close()
        first = [f"evaluating the base model on {len(eval_set)} held-out examples"] * bool(eval_set)
        first += ["sampling an answer"] * sample
        if first:
            log(
                " and ".join(first) + " (XLA compiles these programs first; later calls reuse them)"
            )
        meta = {
            "eval_loss_before": evaluate_loss(
                eval_fn, lora, params, eval_set, batch_size, seq_len, pad_id
            ),
            "sample_before": None,
            "train_time_s": 0.0,
            "timed_tokens": 0,
            "timed_s": 0.0,
        }
        if sample:
            # B = 0 at init: the adapted model is the base model, and the program is the one
            # the sample after training reuses (one compilation instead of two).
            meta["sample_before"] = report_lib.sample_answer(
                base, params, lora, tokenizer, sample_ids, max_new_tokens=max_new_tokens
            )
        log(f"eval loss before: {_fmt(meta['eval_loss_before'])}")
    meta["args"] = run_args

    shapes_seen: set = set()
    last_eval = None
    saved_step = start_step  # the newest checkpoint of this run holds this step
    meta.setdefault("skipped_steps", [])
    meta.setdefault("nonfinite_streak", 0)
    no_skip = jnp.zeros((), jnp.bool_)
    if start_step < steps:
        shapes = len(stream.buckets)
        log(
            f"training steps {start_step + 1}-{steps}: "
            + (
                "the first step compiles the train step first"
                if shapes == 1
                else f"the first step of each of the {shapes} batch shapes compiles first"
            )
            + ", so early steps are slower"
        )
    bar = _progress(steps, start_step, progress)
    # Time left is estimated from steps that compiled nothing: a compiling step is many
    # times slower, and tqdm's own estimate would promise hours after the first step.
    fast_s, fast_steps = 0.0, 0
    with open(metrics_path, "a") as metrics_file:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            tokens, compiled, micro_losses = 0, False, []
            skipped, micro_skipped = no_skip, []
            for j in range(grad_accum):
                micro = step * grad_accum + j
                batch = stream[micro]
                shape = batch["input_ids"].shape
                if device_mesh is not None:
                    batch = sharding.shard_batch(batch, device_mesh)
                if shape not in shapes_seen:
                    compiled = True
                    bar.set_postfix_str(f"compiling the step for batch shape {tuple(shape)}")
                shapes_seen.add(shape)
                tokens += int(batch["attention_mask"].sum())
                # A non-finite micro-batch discards the rest of its accumulated update too.
                state, m = step_fn(
                    state, params, batch, rng=jax.random.fold_in(rng, micro), skip=skipped
                )
                skipped = m["skipped"]
                micro_skipped.append(skipped)
                micro_losses.append(m["loss"])
            loss = float(np.mean([float(x) for x in micro_losses]))  # waits for the step
            dt = time.perf_counter() - t0
            meta["train_time_s"] += dt
            if not compiled:  # throughput of steps that did not include compiling a new shape
                meta["timed_tokens"] += tokens
                meta["timed_s"] += dt
                fast_s, fast_steps = fast_s + dt, fast_steps + 1
            done = step + 1
            record: dict[str, Any] = {"step": done}
            if bool(skipped):  # the state is still that of the step before
                if grad_accum > 1:  # the micro-batches before the bad one were accumulated
                    applied = sum(not bool(x) for x in micro_skipped)
                    state = nonfinite.undo_partial_accumulation(state, applied)
                meta["skipped_steps"].append(done)
                meta["nonfinite_streak"] += 1
                reason = nonfinite.reason(loss, float(m["grad_norm"]))
                record.update(skipped=True, reason=reason)
            else:
                meta["nonfinite_streak"] = 0
                record.update(loss=loss, grad_norm=float(m["grad_norm"]))
            # The schedule at this step (each skipped update before it delays the optimizer's).
            record.update(tokens_per_s=tokens / dt, lr=float(make_schedule(lr, warmup_steps)(step)))
            streak = meta["nonfinite_streak"]
            if streak and (on_nonfinite == "stop" or streak >= nonfinite.MAX_CONSECUTIVE_NONFINITE):
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.close()
                kept = nonfinite.keep_last_good(
                    ckpt_dir, done - streak, saved_step, state, rng, meta, grad_accum
                )
                raise nonfinite.NonFiniteLossError(done, reason, streak, kept, on_nonfinite)
            if streak:
                log(f"step {done}: {reason}; its update was skipped")
            if eval_set and (done % eval_every == 0 or done == steps):
                last_eval = evaluate_loss(
                    eval_fn, state.lora, params, eval_set, batch_size, seq_len, pad_id
                )
                record["eval_loss"] = last_eval
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.update(1)
            bar.set_postfix(
                {
                    "loss": f"{loss:.3f}",
                    "eval_loss": _fmt(last_eval),
                    "tok_s": f"{tokens / dt:.0f}",
                    "left": _time_left(steps - done, fast_s, fast_steps),
                }
            )
            if done % save_every == 0 or done == steps:
                meta["data_position"] = done * grad_accum  # micro-batches consumed
                ckpt.save_checkpoint(ckpt_dir, done, {"state": state, "rng": rng}, meta)
                saved_step = done
    bar.close()

    lora = state.lora
    if start_step >= steps and eval_set:
        last_eval = evaluate_loss(eval_fn, lora, params, eval_set, batch_size, seq_len, pad_id)
    sample_after = (
        report_lib.sample_answer(
            base, params, lora, tokenizer, sample_ids, max_new_tokens=max_new_tokens
        )
        if sample
        else None
    )
    _save_adapter(out, lora, lora_config, model)
    result = FinetuneResult(
        out=out,
        model=model,
        data=data,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        n_train=len(train_set),
        n_eval=len(eval_set),
        eval_loss_before=meta["eval_loss_before"],
        eval_loss_after=last_eval,
        tokens_per_s=meta["timed_tokens"] / meta["timed_s"] if meta["timed_s"] else 0.0,
        train_time_s=meta["train_time_s"],
        memory=report_lib.peak_memory_bytes(),
        sample_prompt=tokenizer.decode(sample_ids) if sample else None,
        sample_before=meta["sample_before"],
        sample_after=sample_after,
        lora=lora,
        skipped_steps=list(meta["skipped_steps"]),
    )
    report_lib.plot_loss(report_lib.read_metrics(metrics_path), os.path.join(out, "loss.png"))
    text = report_lib.format_report(result)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    log(
        f"eval loss: {_fmt(result.eval_loss_before)} before -> {_fmt(result.eval_loss_after)} after"
    )
    if sample:
        log(f"sample before: {result.sample_before!r}\nsample after:  {result.sample_after!r}")
    if result.skipped_steps:
        log(f"skipped {len(result.skipped_steps)} non-finite steps: {result.skipped_steps}")
    log(
        f"{result.tokens_per_s:.0f} tokens/s, peak RSS {result.memory['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"{time.time() - t_start:.0f} s in all; adapter, loss.png and report.md in {out}"
    )
    return result


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


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
