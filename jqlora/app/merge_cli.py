"""`jqlora merge`: a base checkpoint + a PEFT adapter -> one Hugging Face checkpoint.

    jqlora merge --model BASE --adapter ADAPTER --out OUT [--dtype bfloat16] [--quantize nf4]

Each adapted weight becomes ``W + s B A`` (DoRA: ``m / ||W + s B A||_row * (W + s B A)``),
computed in float32 from the dequantized base weight, as PEFT merges into a 4-bit base;
the result is written in ``--dtype`` by ``save_hf`` and loads in transformers (and vLLM)
without peft. ``--quantize`` stores the merged weights in 4 bits (bitsandbytes format):
that rounds part of the adapter's small update away, so keep the float output when
quality matters. Tokenizer files of BASE are copied beside the weights.
"""

from __future__ import annotations

import argparse
import os
import shutil

from jqlora.app.parsing import HelpFormatter, InputError

DTYPES = ("bfloat16", "float16", "float32")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def merge_checkpoint(
    model_path, adapter_path, out_dir, *, dtype="float32", quantize: str | None = None
) -> None:
    """Loads ``model_path`` and the PEFT adapter, merges (float32 math), saves to ``out_dir``."""
    from jqlora.hf import QuantConfig, load_hf, save_hf
    from jqlora.hf.peft import load_peft_adapter
    from jqlora.lora.merge import merge_lora

    model, params = load_hf(model_path, dtype="float32")
    lora, _ = load_peft_adapter(adapter_path, params)
    merged = merge_lora(params, lora, dtype=dtype)
    quantization = None if quantize is None else QuantConfig(quant_type=quantize)
    save_hf(out_dir, model, merged, quantization=quantization)
    if os.path.isdir(model_path):
        for name in TOKENIZER_FILES:
            src = os.path.join(model_path, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out_dir, name))
    elif os.fspath(model_path).endswith(".gguf"):
        # A GGUF file carries its tokenizer inside: write it out in transformers' files, so
        # the merged checkpoint is complete (generate, chat and transformers load it as is).
        from jqlora.hf.tokenizer import load_gguf_tokenizer

        load_gguf_tokenizer(model_path).save_pretrained(out_dir)


def run(args: argparse.Namespace) -> int:
    from jqlora.hf.hub import resolve_model

    try:
        args.model = resolve_model(args.model)
    except ValueError as e:
        raise InputError(f"--model {e}") from None
    for flag, path in (("--model", args.model), ("--adapter", args.adapter)):
        if not os.path.exists(path):
            raise InputError(f"{flag} {path}: no such file or directory")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out}: exists and is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise InputError(f"--out {args.out}: exists and is not empty (pass --force to replace it)")
    try:  # both inputs checked before the (slow) loading starts
        from jqlora.hf.load import check_checkpoint_path
        from jqlora.hf.peft import check_adapter

        check_checkpoint_path(args.model)
        check_adapter(args.adapter)
    except ValueError as e:
        raise InputError(str(e)) from None
    try:
        merge_checkpoint(
            args.model, args.adapter, args.out, dtype=args.dtype, quantize=args.quantize
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    note = f", {args.quantize} 4-bit (lossy for the adapter's update)" if args.quantize else ""
    print(f"merged {args.adapter} into {args.model} -> {args.out} ({args.dtype}{note})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold a PEFT LoRA adapter into its base model and write a Hugging Face checkpoint",
        description=(
            "Fold a PEFT LoRA/DoRA adapter into the base weights and write a Hugging Face checkpoint "
            "that transformers loads without peft. The merge is computed in float32 from the "
            "dequantized base weights (as PEFT does for 4-bit bases), then stored in --dtype."
        ),
        epilog="example (after `jqlora finetune`):\n"
        "  jqlora merge --model smollm2-135m-instruct --adapter runs/smollm2-house-style "
        "--out out/merged",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="base checkpoint: a Hugging Face directory (float or bitsandbytes 4-bit) or Hub "
        "id (org/name), a .gguf file, or smollm2-135m-instruct",
    )
    p.add_argument(
        "--adapter",
        required=True,
        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
    )
    p.add_argument("--out", required=True, help="output directory for the merged checkpoint")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the written weights",
    )
    p.add_argument(
        "--quantize",
        choices=("nf4", "fp4"),
        default=None,
        help="store the merged linear weights in 4 bits (bitsandbytes format); lossy: 4-bit rounding "
        "erases part of the adapter's update",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
