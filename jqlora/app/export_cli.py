"""`jqlora export`: a model (with its LoRA adapter merged), or the adapter alone, as GGUF for
llama.cpp and Ollama, with an Ollama Modelfile beside it.

    jqlora export --model M [--adapter A] --out FILE.gguf [--outtype f16] [--adapter-only]
"""

from __future__ import annotations

import argparse
import os

from jqlora.app.parsing import HelpFormatter, InputError
from jqlora.hf.gguf_outtypes import ADAPTER_OUTTYPES, OUTTYPES


def export(args: argparse.Namespace) -> tuple[str, str]:
    """Load, export, write the Modelfile; returns (exported file, Modelfile)."""
    import jax.numpy as jnp

    from jqlora.hf import load_hf
    from jqlora.hf.gguf_export import save_gguf, save_gguf_adapter
    from jqlora.hf.ollama import write_modelfile
    from jqlora.hf.peft import load_peft_adapter

    model, params = load_hf(args.model, dtype=jnp.float32)
    lora = load_peft_adapter(args.adapter, params)[0] if args.adapter else None
    if args.adapter_only:
        assert lora is not None  # run() requires --adapter with --adapter-only
        save_gguf_adapter(args.out, model, lora, outtype=args.outtype)
        base = args.model if args.model.endswith(".gguf") else None
        modelfile = write_modelfile(base, adapter_gguf=args.out) if base else None
    else:
        save_gguf(args.out, model, params, lora, tokenizer=args.model, outtype=args.outtype)
        modelfile = write_modelfile(args.out)
    return args.out, str(modelfile) if modelfile else ""


def run(args: argparse.Namespace) -> int:
    from jqlora.hf.hub import resolve_model

    try:
        args.model = resolve_model(args.model)
    except ValueError as e:
        raise InputError(f"--model {e}") from None
    if args.outtype is None:
        args.outtype = "f32" if args.adapter_only else "f16"
    if args.adapter_only and not args.adapter:
        raise InputError("--adapter-only needs --adapter")
    if args.adapter_only and args.outtype not in ADAPTER_OUTTYPES:
        raise InputError(
            f"--outtype {args.outtype}: an adapter is stored as one of {', '.join(ADAPTER_OUTTYPES)}"
        )
    for flag, path in (("--model", args.model), ("--adapter", args.adapter)):
        if path and not os.path.exists(path):
            raise InputError(f"{flag} {path}: no such file or directory")
    if not args.out.endswith(".gguf"):
        raise InputError(f"--out {args.out}: expected a file name ending in .gguf")
    if os.path.isdir(args.out):
        raise InputError(f"--out {args.out}: is a directory")
    if os.path.exists(args.out) and not args.force:
        raise InputError(f"--out {args.out}: exists (pass --force to replace it)")
    try:  # both inputs checked before the (slow) loading starts
        from jqlora.hf.load import check_checkpoint_path
        from jqlora.hf.peft import check_adapter

        check_checkpoint_path(args.model)
        if args.adapter:
            check_adapter(args.adapter)
        out, modelfile = export(args)
    except ValueError as e:
        raise InputError(str(e)) from None
    what = "adapter of" if args.adapter_only else "merged" if args.adapter else "model"
    print(f"wrote {out} ({what} {args.model}, {args.outtype})")
    if modelfile:
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile}")
    if args.adapter_only:
        print(f"llama.cpp: llama-cli -m BASE.gguf --lora {out}")
    else:
        print(f"llama.cpp: llama-cli -m {out} -cnv")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model (adapter merged) or a LoRA adapter as GGUF for llama.cpp and Ollama",
        description=(
            "Write the model, with the PEFT adapter merged in float32, as one GGUF file that "
            "llama.cpp, Ollama and LM Studio load, with its tokenizer and chat template, and an "
            "Ollama Modelfile beside it (NAME.Modelfile). With --adapter-only, write the adapter "
            "alone in llama.cpp's LoRA format (llama-cli --lora, Ollama's ADAPTER), to use on a "
            "GGUF of the same base."
        ),
        epilog="example (after `jqlora finetune`):\n"
        "  jqlora export --model smollm2-135m-instruct --adapter runs/smollm2-house-style "
        "--out out/smollm2-house-style.gguf\n"
        "  ollama create smollm2-house-style -f out/smollm2-house-style.Modelfile",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="base checkpoint: a Hugging Face directory (float or bitsandbytes 4-bit) or Hub "
        "id (org/name), a .gguf file, or smollm2-135m-instruct",
    )
    p.add_argument(
        "--adapter", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    p.add_argument("--out", required=True, help="the GGUF file to write (FILE.gguf)")
    p.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default=None,
        help="storage of the weight matrices (norms stay f32); default f16, f32 with "
        "--adapter-only (which takes f32, f16, bf16, q8_0)",
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="write the adapter alone as a llama.cpp LoRA GGUF instead of the merged model",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
