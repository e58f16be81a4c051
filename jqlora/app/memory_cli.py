"""``jqlora estimate-memory``: the memory a fine-tuning run needs, before running it."""

from __future__ import annotations

import argparse

from jqlora.app import argtypes
from jqlora.train.choices import OPTIMIZERS


def register(subparsers) -> None:
    from jqlora.app.parsing import HelpFormatter

    p = subparsers.add_parser(
        "estimate-memory",
        help="estimate the memory of a QLoRA run beside full and 16-bit LoRA fine-tuning",
        description="Count the device memory of one train step: base weights (exact 4-bit size with "
        "quantization constants), LoRA parameters, gradients, optimizer state, activations and logits; "
        "side by side with 16-bit LoRA and full fine-tuning (16 bytes per parameter). Only the "
        "model's config is read, not its weights.",
        epilog="examples:\n"
        "  jqlora estimate-memory --model smollm2-135m-instruct --lora-r 16 --batch-size 8 "
        "--seq-len 128\n"
        "  jqlora estimate-memory --model path/to/Llama-3-70B --mesh fsdp=8",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory or its config.json (Hugging Face), a Hub id, a .gguf file, or "
        "smollm2-135m-instruct",
    )
    p.add_argument(
        "--batch-size", type=argtypes.positive_int, default=1, help="sequences per micro-batch"
    )
    p.add_argument("--seq-len", type=argtypes.positive_int, default=512, help="tokens per sequence")
    p.add_argument("--lora-r", type=argtypes.positive_int, default=8, help="adapter rank")
    p.add_argument(
        "--lora-alpha", type=argtypes.positive_float, default=16.0, help="adapter scale = alpha / r"
    )
    p.add_argument(
        "--target-modules",
        default="all-linear",
        help="'all-linear', a comma-separated list of module names (q_proj,v_proj), or a regex",
    )
    p.add_argument(
        "--quant",
        choices=("nf4", "fp4", "none"),
        default="nf4",
        help="4-bit format of the base; none: the base in --compute-dtype",
    )
    p.add_argument(
        "--blocksize", type=argtypes.blocksize, default=64, help="weights per absmax scale"
    )
    p.add_argument(
        "--no-double-quant",
        action="store_true",
        help="absmax scales in float32 (default: double quantization, 8-bit scales)",
    )
    p.add_argument(
        "--offload", action="store_true", help="optimizer state in host memory, not on the device"
    )
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=OPTIMIZERS,
        help="the optimizer whose state is counted (adamw_8bit: 8-bit moments)",
    )
    p.add_argument(
        "--remat",
        action="store_true",
        help="rematerialize each decoder layer (finetune --remat; on a CPU, with --scan-layers)",
    )
    p.add_argument(
        "--compute-dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="dtype of the activations and the dequantized weights",
    )
    p.add_argument(
        "--backend",
        choices=("kernel", "xla"),
        default="kernel",
        help="'kernel': the Pallas kernels (TPU), close to a GPU's XLA path; 'xla': the CPU's path",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="per-device figures for a sharded run, e.g. data=2,fsdp=4 (see docs/distributed.md)",
    )
    p.set_defaults(func=run)


def _targets(text: str):
    if text == "all-linear" or "," not in text and not text.isidentifier():
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


def run(args: argparse.Namespace) -> int:
    from jqlora.app.parsing import InputError
    from jqlora.hf.hub import resolve_model
    from jqlora.hf.quant_config import QuantConfig
    from jqlora.lora import LoraConfig
    from jqlora.memory import estimate_memory

    try:
        args.model = resolve_model(args.model)
        lora = LoraConfig(
            r=args.lora_r, alpha=args.lora_alpha, target_modules=_targets(args.target_modules)
        )
        quant = None
        if args.quant != "none":
            quant = QuantConfig(
                quant_type=args.quant,
                blocksize=args.blocksize,
                double_quant=not args.no_double_quant,
            )
        if not isinstance(lora.target_modules, str):  # each listed name must select a layer
            from jqlora.hf.load import linear_layers
            from jqlora.lora.targets import check_target_names
            from jqlora.memory import load_config

            check_target_names(lora.target_modules, linear_layers(load_config(args.model)))
        est = estimate_memory(
            args.model,
            lora,
            args.batch_size,
            args.seq_len,
            quantization=quant,
            offload=args.offload,
            optimizer=args.optimizer,
            remat=args.remat,
            compute_dtype=args.compute_dtype,
            backend=args.backend,
        )
        if args.mesh:
            from jqlora.sharding import per_device

            est = per_device(est, args.mesh)
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.mesh:
        print(
            f"Per device of the mesh {args.mesh} (weights split over fsdp x tensor, activations over data x fsdp)."
        )
    print(est.summary())
    print()
    print(est.table())
    print()
    print(
        "Counted: weights and adapters exactly from the model's shapes; full fine-tuning at 16 bytes "
        "per parameter (2 weight + 2 gradient + 4 f32 master + 8 AdamW); activations per decoder layer "
        f"({'remat: layer inputs + one layer' if args.remat else 'no remat: every layer'}) in "
        f"{args.compute_dtype}, see jqlora.memory."
    )
    return 0
