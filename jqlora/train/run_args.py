"""The arguments of a fine-tuning run (see ``jqlora.train.loop``): their defaults, their
checks, what they resolve to, and what a resumed run must agree on with its checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from importlib import resources
from typing import Any

from jqlora.train import checkpoint as ckpt
from jqlora.train import data as data_lib

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
    "scan_layers",
    "seed",
    "warmup_steps",
    "eval_fraction",
    "max_grad_norm",
    "compute_dtype",
)
# Settings newer than some checkpoints: those checkpoints were written with these values.
_ADDED_LATER = {"scan_layers": False}


@dataclasses.dataclass(frozen=True)
class FinetuneArgs:
    """The arguments of one ``finetune`` call, as given (``finetune`` documents each)."""

    model: str
    data: str | None
    out: str
    steps: int | None
    epochs: float | None
    batch_size: int
    grad_accum: int
    seq_len: int
    lr: float
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: Any
    quant: str
    offload_optimizer: bool
    remat: bool
    scan_layers: bool
    eval_every: int
    save_every: int
    resume: bool
    seed: int
    warmup_steps: int | None
    eval_fraction: float
    max_grad_norm: float
    compute_dtype: Any
    mesh: Any
    on_nonfinite: str
    sample: bool
    max_new_tokens: int
    progress: bool
    log: Callable[[str], object]


def default_data_path() -> str:
    """The house-style instruction set shipped with jqlora (see scripts/make_house_style_data.py)."""
    return str(resources.files("jqlora") / "data" / "house_style.jsonl")


def resolve_model_path(model: str) -> str:
    """A model directory, a ``.gguf`` file, or the name of a model jqlora knows how to find."""
    from jqlora.hf.hub import resolve_model

    model = resolve_model(model)
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"model {model!r}: no such directory or file (or use {DEFAULT_MODEL!r})"
        )
    return model


def check_args(args: FinetuneArgs) -> None:
    """Raises ``ValueError`` for an argument out of range, before anything loads."""
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give steps or epochs, not both")
    for name, v in (
        ("batch_size", args.batch_size),
        ("grad_accum", args.grad_accum),
        ("eval_every", args.eval_every),
        ("save_every", args.save_every),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    steps = args.steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for name, x in (
        ("lr", args.lr),
        ("epochs", args.epochs),
        ("max_grad_norm", args.max_grad_norm),
    ):
        if x is not None and not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    if args.quant not in ("nf4", "fp4", "none"):
        raise ValueError(f"quant must be nf4, fp4 or none, got {args.quant!r}")
    if args.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {args.on_nonfinite!r}")


def total_steps(args: FinetuneArgs, stream: data_lib.BatchStream) -> int:
    """``args.steps``, or ``args.epochs`` over the training set in updates, or DEFAULT_STEPS."""
    if args.steps is not None:
        steps = args.steps
    elif args.epochs is not None:
        updates_per_epoch = -(-stream.batches_per_epoch // args.grad_accum)
        steps = max(1, round(args.epochs * updates_per_epoch))
    else:
        steps = DEFAULT_STEPS
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return steps


def checkpointed_args(
    args: FinetuneArgs, data: str, warmup_steps: int, compute_dtype
) -> dict[str, Any]:
    """The settings a checkpoint records, as JSON values."""
    target_modules = args.target_modules
    return dict(
        model=args.model,
        data=os.path.abspath(data),
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        lr=args.lr,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        quant=args.quant,
        offload_optimizer=args.offload_optimizer,
        remat=args.remat,
        scan_layers=args.scan_layers,
        seed=args.seed,
        warmup_steps=warmup_steps,
        eval_fraction=args.eval_fraction,
        max_grad_norm=args.max_grad_norm,
        compute_dtype=compute_dtype.name,
    )


def checkpoint_to_resume(args: FinetuneArgs, run_args: dict[str, Any]) -> str | None:
    """The newest checkpoint in ``args.out`` when resuming (None: start afresh); raises
    ``ValueError`` for checkpoints a run would overwrite or cannot continue from."""
    latest = ckpt.latest_checkpoint(os.path.join(args.out, "checkpoints"))
    if latest and not args.resume:
        raise ValueError(
            f"{args.out} already holds checkpoints of a run; pass resume=True (--resume) or another output directory"
        )
    if latest:
        saved = {**_ADDED_LATER, **ckpt.read_meta(latest)["args"]}
        diff = {k: (saved.get(k), run_args[k]) for k in _RESUME_KEYS if saved.get(k) != run_args[k]}
        if diff:
            raise ValueError(
                f"{latest}: cannot resume with different settings (saved, now): {diff}"
            )
    return latest
