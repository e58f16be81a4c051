"""``jqlora quantize SRC_DIR OUT_DIR``: a float checkpoint -> a bitsandbytes 4-bit checkpoint.

Streams: one tensor is read, quantized (if it is a linear weight the config covers) and
added to the current output shard, so memory holds one float tensor and one output shard.
The result is what transformers + bitsandbytes would save after quantizing the source
itself, and loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from jqlora.app import argtypes

if TYPE_CHECKING:
    from jqlora.hf.quant_config import QuantConfig


def quantize_checkpoint(
    src,
    out,
    quantization: QuantConfig | None = None,
    *,
    max_shard_bytes: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Write ``src`` (float safetensors) to ``out`` in bitsandbytes 4-bit format (default:
    NF4, blocksize 64, double quant, lm_head kept in float; shards of at most
    ``max_shard_bytes``, default ``safetensors_io.MAX_SHARD_BYTES``); atomic."""
    from jqlora.hf import safetensors_io
    from jqlora.hf.bnb_io import bnb_tensors
    from jqlora.hf.load import checkpoint_plan, convert_tensor, progress_bar, read_config
    from jqlora.hf.quant_config import QuantConfig
    from jqlora.models import model_for_config
    from jqlora.quant import QuantizedTensor

    quantization = quantization or QuantConfig()
    max_shard_bytes = max_shard_bytes or safetensors_io.MAX_SHARD_BYTES

    src, out = Path(src), Path(out)
    hf_config = read_config(src)
    if hf_config.get("quantization_config"):
        raise ValueError(f"{src / 'config.json'}: the checkpoint is already quantized")
    model = model_for_config(hf_config, source=str(src / "config.json"))
    files, wanted, expected, ckpt = checkpoint_plan(src, model)
    config = dict(hf_config)
    config["quantization_config"] = quantization.to_hf(
        hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    )
    with safetensors_io.atomic_directory(out) as tmp:
        writer = safetensors_io.ShardWriter(tmp, max_shard_bytes)
        with progress_bar(len(wanted), f"quantizing {src.name}", progress) as bar:
            for name, file, array in safetensors_io.iter_tensors(files, list(wanted)):
                pname = wanted[name]
                leaf = convert_tensor(
                    array,
                    pname,
                    expected,
                    quantization,
                    None,
                    transpose=ckpt.is_transposed(pname),
                    source=f"{file}: tensor {name!r}",
                )
                if isinstance(leaf, QuantizedTensor):
                    for key, value in bnb_tensors(pname, leaf).items():
                        writer.add(key, value)
                else:
                    writer.add(name, array)  # as stored (Conv1D orientation included)
                bar.update()
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _copy_tokenizer(src, tmp)
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Tokenizer and generation files travel with the weights."""
    import shutil

    for pattern in (
        "tokenizer*",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
        "chat_template*",
    ):
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)


def register(subparsers) -> None:
    from jqlora.app.parsing import HelpFormatter

    p = subparsers.add_parser(
        "quantize",
        help="convert a float checkpoint to a bitsandbytes 4-bit checkpoint",
        description="Convert a float Hugging Face checkpoint (safetensors) to a bitsandbytes "
        "4-bit checkpoint, one tensor at a time. transformers loads the result with "
        "AutoModelForCausalLM.from_pretrained(OUT_DIR), and jqlora's --model options take it.",
        epilog="examples:\n"
        "  jqlora quantize out/merged out/merged-bnb-4bit\n"
        "  jqlora quantize path/to/float_model out/model-fp4 --quant-type fp4 "
        "--no-double-quant",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "src",
        metavar="SRC_DIR",
        help="float Hugging Face checkpoint directory (config.json + *.safetensors), e.g. "
        "the output of `jqlora merge`",
    )
    p.add_argument(
        "out", metavar="OUT_DIR", help="where to write the 4-bit checkpoint (a new directory)"
    )
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type")
    p.add_argument(
        "--blocksize", type=argtypes.blocksize, default=64, help="weights per absmax scale"
    )
    p.add_argument(
        "--no-double-quant",
        action="store_true",
        help="keep the absmax scales in float32 (default: double quantization, 8-bit scales)",
    )
    p.add_argument(
        "--skip-modules",
        nargs="*",
        default=["lm_head"],
        metavar="MODULE",
        help="names of linear modules kept in float; give them after SRC_DIR OUT_DIR",
    )
    p.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists and is not empty"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from jqlora.app.parsing import InputError
    from jqlora.hf.quant_config import QuantConfig

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"{args.out}: exists and is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        # The output replaces OUT_DIR whole: never a directory the user did not mean to lose.
        raise InputError(f"{args.out}: exists and is not empty (pass --force to replace it)")
    try:
        quantization = QuantConfig(
            args.quant_type, args.blocksize, not args.no_double_quant, tuple(args.skip_modules)
        )
        out = quantize_checkpoint(args.src, args.out, quantization)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    print(f"wrote {out}")
    return 0
