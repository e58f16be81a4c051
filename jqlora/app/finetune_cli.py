"""`jqlora finetune`: QLoRA fine-tuning from the command line (see ``jqlora.app.loop.finetune``).

With no arguments it fine-tunes SmolLM2-135M-Instruct on the house-style set shipped with
jqlora and shows the eval loss and a sample answer before and after. Its flags are those
of ``FinetuneConfig`` (``jqlora.app.config``), generated from it.
"""

from __future__ import annotations

import os
import sys

from jqlora.app import config_io
from jqlora.app.config import DEFAULT_MODEL, FinetuneConfig
from jqlora.app.parsing import HelpFormatter, InputError

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
  jqlora finetune --config run.yaml --lr 1e-4    a config file's options, one replaced
  jqlora finetune --model ./Llama-3-8B --mesh data=2,fsdp=4     on 8 devices

It writes OUT/config.yaml (every option, resolved: --config takes it back),
OUT/adapter_model.safetensors + adapter_config.json (a PEFT adapter), metrics.jsonl,
loss.png, report.md and checkpoints/. Try the adapter with
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
        "--config",
        default=None,
        help="a YAML or JSON file of options (keys as the flags' names, as in OUT/config.yaml); "
        "flags given on the command line replace its values",
    )
    config_io.add_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from jqlora.app.loop import NonFiniteLossError, finetune
    from jqlora.train.checkpoint import DISK_FULL_ERRNOS, DiskFullError, latest_checkpoint
    from jqlora.train.data import DataError

    try:
        config = config_io.from_args(args)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    out = config.output.dir
    _check_inputs(config)
    try:
        finetune(config)
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
            what = f"cannot write to {out}: the disk is full ({e.strerror})"
        latest = latest_checkpoint(os.path.join(out, "checkpoints"))
        then = f"add --resume to continue from {latest}" if latest else "run again"
        return _fail(f"{what}. Free some disk space, then {then}")
    return 0


def _check_inputs(config: FinetuneConfig) -> None:
    """The arguments a run reads, checked in a moment before any tokenizer or model loads:
    the output path, every line of the data file, the model path and its config.json, and
    the LoRA settings against the model's linear layers (each listed target name must
    select one). Raises ``InputError`` naming the file, line or option."""
    from jqlora.app.loggers import check_installed
    from jqlora.hf.hub import resolve_model
    from jqlora.hf.load import check_checkpoint_path, linear_layers
    from jqlora.hf.tokenizer import check_tokenizer_dir
    from jqlora.lora.targets import check_target_names
    from jqlora.train.data import check_data_file

    out, data, model = config.output.dir, config.data.path, config.model.path
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: exists and is not a directory")
    targets = config.lora.target_modules
    try:
        if data is not None:
            check_data_file(data)
        if config.data.eval_data is not None:
            check_data_file(config.data.eval_data)
        check_installed(config.output.report_to)
        if model.lower() != DEFAULT_MODEL:
            if not os.path.exists(resolve_model(model)):  # a Hub id: its snapshot
                raise ValueError(
                    f"--model {model}: no such directory or file (or use {DEFAULT_MODEL!r})"
                )
            hf_config = check_checkpoint_path(model)
            check_tokenizer_dir(model)
            if hf_config is not None:  # a GGUF file's layers are checked once it is loaded
                check_target_names(targets, linear_layers(hf_config, f"{model}/config.json"))
    except (ValueError, ImportError) as e:
        raise InputError(str(e)) from None


def _fail(message: str) -> int:
    """The run could not finish for a reason outside the arguments: say why, exit 1."""
    print(f"jqlora finetune: error: {message}", file=sys.stderr)
    return 1
