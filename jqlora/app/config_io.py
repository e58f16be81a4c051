"""The run configuration outside Python (see `jqlora.app.config`): the flags of
`jqlora finetune`, ``--config`` files, ``OUT/config.yaml`` and the resume check against it."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

from jqlora.app.config import OPTIONS, QUANT_OPTION, FinetuneConfig
from jqlora.hf.quant_config import QuantConfig

CONFIG_FILE = "config.yaml"


class _Given(argparse.Action):
    """Stores the flag's value and notes that it was given: a flag left out keeps a
    ``--config`` file's value, a flag given (even with the default's value) replaces it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        given = getattr(namespace, "given_options", set())
        namespace.given_options = given | {self.dest}


#: section -> the heading of its flags in ``--help``
HELP_GROUPS = {
    "model": "model",
    "quant": "model",
    "data": "data",
    "lora": "adapter",
    "optim": "optimizer and schedule",
    "schedule": "optimizer and schedule",
    "loop": "loop",
    "output": "output",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag ``--key`` for each option with ``flag=True``: its help, its default (the
    default config's), its check as the argparse type, under its section's heading
    (`HELP_GROUPS`). Options of one exclusive group are mutually exclusive flags."""
    defaults = FinetuneConfig()
    groups: dict[str, Any] = {}
    headings: dict[str, Any] = {}
    for key, ref in OPTIONS.items():
        opt = ref.option
        if not opt.flag:
            continue
        heading = HELP_GROUPS[ref.section]
        if heading not in headings:
            headings[heading] = parser.add_argument_group(heading)
        target: Any = headings[heading]
        if opt.exclusive:
            if opt.exclusive not in groups:
                groups[opt.exclusive] = target.add_mutually_exclusive_group()
            target = groups[opt.exclusive]
        flag = "--" + key.replace("_", "-")
        kwargs: dict[str, Any] = dict(dest=key, help=opt.help, action=_Given)
        default = ref.dump(defaults)
        if default is False:  # a switch
            target.add_argument(flag, nargs=0, const=True, default=False, **kwargs)
            continue
        if key == QUANT_OPTION.key:  # the shorthand on the command line
            kwargs.update(choices=("nf4", "fp4", "none"), default=_quant_flag(defaults.quant))
        else:
            kwargs.update(default=default, choices=opt.choices, type=opt.parse)
        target.add_argument(flag, **kwargs)


def _quant_flag(quant: QuantConfig | None) -> str:
    return "none" if quant is None else quant.quant_type


def from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The config of a ``jqlora finetune`` command line: the defaults, then the
    ``--config`` file's values, then the flags given."""
    given = {k: getattr(args, k) for k in getattr(args, "given_options", ())}
    base = FinetuneConfig()
    if getattr(args, "config", None):
        base = base.replace(**read_file(args.config))
    return base.replace(**given)


def read_file(path: str) -> dict[str, Any]:
    """``{key: value}`` of a YAML or JSON config file (keys as in config.yaml, or flags'
    names with dashes). Raises ``ValueError`` naming the file."""
    import yaml

    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path}: is a directory") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(
            f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    unknown = [k for k in values if str(k).replace("-", "_") not in OPTIONS]
    if unknown:
        raise ValueError(
            f"--config {path}: unknown option(s) {', '.join(map(str, unknown))} "
            f"(known: {', '.join(OPTIONS)})"
        )
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def write_file(config: FinetuneConfig, path: str) -> None:
    """``config.to_dict()`` as YAML at ``path`` (written beside it and renamed: whole or absent)."""
    import yaml

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


def differences(saved: Mapping[str, Any], config: FinetuneConfig) -> dict[str, tuple]:
    """``{key: (saved, now)}`` for each option a resumed run must keep (not ``resumable``)
    whose value in ``config`` differs from ``saved`` (config.yaml's values). A key missing
    from ``saved`` (an option newer than the run) counts as its default."""
    now = config.to_dict()
    defaults = FinetuneConfig().to_dict()
    diff = {}
    for key, ref in OPTIONS.items():
        if ref.option.resumable:
            continue
        before = saved.get(key, defaults[key])
        if _normal(before) != _normal(now[key]):
            diff[key] = (before, now[key])
    return diff


def _normal(value):
    """A value compared as config.yaml holds it (tuples as lists, 1e-3 as 0.001)."""
    return json.loads(json.dumps(value, default=list))
