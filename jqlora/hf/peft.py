"""PEFT LoRA adapters in and out: ``adapter_model.safetensors`` + ``adapter_config.json``.

The file layout is what peft 0.21 writes for a causal LM::

    base_model.model.<module path>.lora_A.weight         [r, in]
    base_model.model.<module path>.lora_B.weight         [out, r]
    base_model.model.<module path>.lora_magnitude_vector [out]     (DoRA only)

with the adapter name stripped. jqlora's ``lora`` tree holds the same tensors in the same
orientation at the module's params path (``{"a", "b", "spec", "magnitude"?}``), so the
conversion is a renaming plus the scale: PEFT keeps ``lora_alpha`` (and ``rank_pattern`` /
``alpha_pattern``) in the config and computes ``scale = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA) per module; jqlora keeps the scale in each entry's ``LoraSpec``.

GPT-2's Conv1D layers store the base weight as ``[in, out]``, hence PEFT's
``fan_in_fan_out: true``; that flag only changes how PEFT reads the *base* weight, the
``lora_A`` / ``lora_B`` tensors have the orientation above for every layer type.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jqlora.lora.check import adapters, check_lora
from jqlora.lora.spec import LoraSpec
from jqlora.lora.targets import dotted

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
# GPT-2's torch Conv1D layers (weight stored [in, out]); PEFT marks them fan_in_fan_out.
_CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc"})
_SUFFIXES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",  # written by peft < 0.12
}
# adapter_config.json fields that change the forward pass in ways jqlora does not model.
_UNSUPPORTED = {
    "modules_to_save": None,
    "lora_bias": False,
    "bias": "none",
    "layer_replication": None,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
}


def _pattern_value(pattern: Mapping[str, Any], path: str, default):
    """PEFT's rank/alpha pattern lookup: the first key ``k`` with ``re.match((.*\\.)?(k)$, path)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _alpha_of(spec: LoraSpec, r: int, use_rslora: bool) -> float:
    return spec.scale * (math.sqrt(r) if use_rslora else r)


def _number(x: float):
    """An alpha as PEFT writes it: an int when it is one."""
    return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else float(x)


def save_peft_adapter(
    out_dir: str | os.PathLike,
    lora: Mapping,
    lora_config,
    *,
    base_model_name_or_path: str | None = None,
    model_type: str | None = None,
) -> None:
    """Writes ``lora`` as a PEFT adapter that ``PeftModel.from_pretrained(base, out_dir)`` loads.

    The per-module rank ``r_m`` is read from the tensors and ``alpha_m = scale_m * r_m``
    (``scale_m * sqrt(r_m)`` with rsLoRA) from each entry's ``LoraSpec``; where the config's
    ``r`` / ``alpha`` (and its patterns) do not reproduce them under PEFT's pattern rule, an
    exact-path entry is put first in ``rank_pattern`` / ``alpha_pattern``. ``target_modules``
    lists the module names that carry an adapter (what PEFT writes after expanding
    ``"all-linear"``), or, for a regex target, a regex of exactly the adapted paths.
    ``model_type`` only sets ``fan_in_fan_out`` (true for GPT-2); by default it is inferred
    from the module paths. PiSSA / LoftQ adapters are written as plain LoRA
    (``init_lora_weights: true``): they apply to the base jqlora trained them on.
    """
    entries = [(dotted(path), entry) for path, entry in adapters(lora)]
    if not entries:
        raise ValueError("save_peft_adapter: the lora tree holds no adapter")
    use_rslora = bool(getattr(lora_config, "use_rslora", False))
    r0 = int(lora_config.r)
    alpha0 = float(getattr(lora_config, "alpha", getattr(lora_config, "lora_alpha", r0)))
    rank_pattern = dict(getattr(lora_config, "rank_pattern", None) or {})
    alpha_pattern = dict(getattr(lora_config, "alpha_pattern", None) or {})
    extra_rank, extra_alpha = {}, {}
    tensors: dict[str, np.ndarray] = {}
    with_magnitude = {path for path, e in entries if "magnitude" in e}
    if with_magnitude and len(with_magnitude) != len(entries):
        raise ValueError("save_peft_adapter: some adapters have a DoRA magnitude and some do not")
    for path, entry in entries:
        a, b = np.asarray(entry["a"], np.float32), np.asarray(entry["b"], np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"save_peft_adapter: {path}: a {a.shape} and b {b.shape} are not [r, in] and [out, r]"
            )
        r = a.shape[0]
        alpha = _alpha_of(entry["spec"], r, use_rslora)
        if _pattern_value(rank_pattern, path, r0) != r:
            extra_rank[re.escape(path)] = r
        if not math.isclose(
            float(_pattern_value(alpha_pattern, path, alpha0)), alpha, rel_tol=1e-6
        ):
            extra_alpha[re.escape(path)] = _number(alpha)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b
        if "magnitude" in entry:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = np.asarray(
                entry["magnitude"], np.float32
            )
    # First match wins in PEFT, so exact paths go before the user's patterns.
    rank_pattern = {**extra_rank, **rank_pattern}
    alpha_pattern = {**extra_alpha, **alpha_pattern}

    target = getattr(lora_config, "target_modules", None)
    paths = [p for p, _ in entries]
    if isinstance(target, str) and target != "all-linear":
        target_modules: Any = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    else:
        target_modules = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if model_type is None:
        is_gpt2 = all(
            p.startswith("transformer.h.") and p.rsplit(".", 1)[-1] in _CONV1D_NAMES for p in paths
        )
        model_type = "gpt2" if is_gpt2 else None
    init = getattr(lora_config, "init", "default")
    config = _peft_config_dict(
        r=r0,
        lora_alpha=_number(alpha0),
        lora_dropout=float(getattr(lora_config, "dropout", 0.0)),
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=bool(with_magnitude),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=model_type == "gpt2",
        init_lora_weights="gaussian" if init == "gaussian" else True,
        base_model_name_or_path=base_model_name_or_path,
    )
    _write(out_dir, tensors, config)


def _peft_config_dict(**fields) -> dict:
    """adapter_config.json with every field peft 0.21 writes, at its default unless given."""
    config: dict[str, Any] = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_VERSION,
        "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None,
        "target_modules": None, "target_parameters": None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None,
    }  # fmt: skip
    config.update(fields)
    return config


def _write(out_dir, tensors: dict, config: dict) -> None:
    """Writes both files beside each other; each appears whole or not at all."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, ADAPTER_WEIGHTS)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG + ".tmp"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(weights + ".tmp", weights)
    os.replace(
        os.path.join(out_dir, ADAPTER_CONFIG + ".tmp"), os.path.join(out_dir, ADAPTER_CONFIG)
    )


def read_peft_config(path: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of an adapter directory, checked to be a LoRA jqlora can run.

    Every field jqlora reads is checked for its type and range (PEFT's meaning), so a bad
    value is reported with the file and the field rather than deep inside loading.
    """
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such adapter directory")
    if not os.path.isdir(path):
        raise ValueError(
            f"{path}: not a directory; a PEFT adapter is a directory with {ADAPTER_CONFIG} "
            f"and {ADAPTER_WEIGHTS}"
        )
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise ValueError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got a {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported"
        )
    for field, neutral in _UNSUPPORTED.items():
        if config.get(field, neutral) not in (neutral, [], {}):
            raise ValueError(
                f"{file}: {field}={config[field]!r} is not supported (only {neutral!r})"
            )
    _check_config_fields(config, file)
    return config


def _is_rank(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 1 and v == int(v)


def _is_alpha(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _check_config_fields(config: dict, file: str) -> None:
    """The fields of adapter_config.json that jqlora reads, each of its PEFT type."""
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise ValueError(f"{file}: {field} is missing")
    if not _is_rank(config["r"]):
        raise ValueError(f"{file}: r must be a positive integer, got {config['r']!r}")
    if not _is_alpha(config["lora_alpha"]):
        raise ValueError(
            f"{file}: lora_alpha must be a positive number, got {config['lora_alpha']!r}"
        )
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{file}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    target = config["target_modules"]
    if isinstance(target, str):
        _check_regex(target, file, "target_modules")
    elif not (
        isinstance(target, list) and target and all(isinstance(t, str) and t for t in target)
    ):
        raise ValueError(
            f"{file}: target_modules must be a regex string or a non-empty list of module names, "
            f"got {target!r}"
        )
    for field in ("use_rslora", "use_dora"):
        if not isinstance(config.get(field, False), bool):
            raise ValueError(f"{file}: {field} must be true or false, got {config[field]!r}")
    for field, valid, what in (
        ("rank_pattern", _is_rank, "a positive integer"),
        ("alpha_pattern", _is_alpha, "a positive number"),
    ):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(
                f"{file}: {field} must be an object of pattern -> value, got {pattern!r}"
            )
        for key, value in pattern.items():
            _check_regex(rf"(.*\.)?({key})$", file, f"{field} key {key!r}")
            if not valid(value):
                raise ValueError(f"{file}: {field}[{key!r}] must be {what}, got {value!r}")


def _check_regex(pattern: str, file: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{file}: {what} is not a valid regex ({e})") from None


def check_adapter(path: str | os.PathLike) -> dict:
    """Check an adapter directory without reading its tensors: ``read_peft_config`` plus the
    weights file's header (present, not truncated, floating-point tensors). Returns the config."""
    config = read_peft_config(path)
    _weights_file(path)
    return config


def _weights_file(path) -> str:
    """The path of ``adapter_model.safetensors``, after checking its header."""
    from jqlora.hf.safetensors_io import read_header

    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        other = [
            f
            for f in ("adapter_model.bin", "adapter_model.pt")
            if os.path.isfile(os.path.join(path, f))
        ]
        hint = f" (found {other[0]}: re-save it with safetensors)" if other else ""
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    # Checked first (truncation, corrupt header) so that errors name the file and tensor.
    for key, meta in read_header(Path(file)).items():
        if meta["dtype"] not in _FLOAT_DTYPES:
            raise ValueError(
                f"{file}: tensor {key!r} has dtype {meta['dtype']}; adapter weights are "
                f"floating-point ({', '.join(_FLOAT_DTYPES)})"
            )
    return file


def _read_tensors(path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    file = _weights_file(path)
    # The flax reader handles bfloat16 (numpy cannot); adapters are held in float32.
    with safe_open(file, framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def load_peft_adapter(path: str | os.PathLike, params: Mapping | None = None):
    """Reads a PEFT LoRA adapter directory into ``(lora, lora_config)``.

    Each module's ``LoraSpec.scale`` is ``alpha_m / r_m`` (``alpha_m / sqrt(r_m)`` with
    rsLoRA), ``r_m`` and ``alpha_m`` resolved through ``rank_pattern`` / ``alpha_pattern`` as
    PEFT does; the resolved rank must equal the tensors' rank. Adapters trained on a
    bitsandbytes 4-bit base have the same layout and load the same way.

    Every key must be ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight`` /
    ``.lora_magnitude_vector``; anything else is an error, never silently dropped. Pass the
    base ``params`` to also check that every adapted path is a linear layer of that model
    with a matching ``[out, in]`` weight: an adapter whose paths miss the model would
    otherwise change nothing.
    """
    config = read_peft_config(path)
    tensors = _read_tensors(path)
    if not tensors:
        raise ValueError(f"{path}/{ADAPTER_WEIGHTS}: holds no tensors")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(
                f"{path}/{ADAPTER_WEIGHTS}: key {key!r} does not start with {PREFIX!r}"
            )
        for suffix, name in _SUFFIXES.items():
            if key.endswith(suffix):
                modules.setdefault(key[len(PREFIX) : -len(suffix)], {})[name] = value
                break
        else:
            raise ValueError(
                f"{path}/{ADAPTER_WEIGHTS}: unsupported key {key!r} (expected <path>.lora_A.weight, "
                ".lora_B.weight or .lora_magnitude_vector, adapter name stripped)"
            )
    use_rslora = bool(config.get("use_rslora", False))
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    rank_pattern, alpha_pattern = (
        config.get("rank_pattern") or {},
        config.get("alpha_pattern") or {},
    )
    dropout = float(config.get("lora_dropout", 0.0))
    lora: dict = {}
    for module, entry in sorted(modules.items()):
        where = f"{path}/{ADAPTER_WEIGHTS}: {module}"
        if "a" not in entry or "b" not in entry:
            raise ValueError(f"{where}: needs both lora_A and lora_B, has {sorted(entry)}")
        a, b = entry["a"], entry["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{where}: lora_A {a.shape} and lora_B {b.shape} are not [r, in] and [out, r]"
            )
        r = _pattern_value(rank_pattern, module, r0)
        if r != a.shape[0]:
            raise ValueError(
                f"{where}: {ADAPTER_CONFIG} gives rank {r} (r or rank_pattern), "
                f"but lora_A and lora_B have rank {a.shape[0]}"
            )
        if config.get("use_dora") and "magnitude" not in entry:
            raise ValueError(f"{where}: use_dora is set but lora_magnitude_vector is missing")
        if "magnitude" in entry and entry["magnitude"].shape != (b.shape[0],):
            raise ValueError(
                f"{where}: lora_magnitude_vector {entry['magnitude'].shape} is not [{b.shape[0]}]"
            )
        alpha = float(_pattern_value(alpha_pattern, module, alpha0))
        spec = LoraSpec(scale=alpha / (math.sqrt(r) if use_rslora else r), dropout=dropout)
        node = lora
        for part in module.split("."):
            node = node.setdefault(part, {})
        node.update({k: entry[k] for k in ("a", "b", "magnitude") if k in entry}, spec=spec)
    if params is not None:
        try:
            check_lora(params, lora)
        except ValueError as e:
            raise ValueError(f"{path}: the adapter does not fit the model: {e}") from None
        _check_targets_exist(config["target_modules"], params, path)
    return lora, _jqlora_config(config)


def _check_targets_exist(target_modules, params: Mapping, path) -> None:
    """PEFT refuses an adapter whose target_modules select no layer of the base model
    (``NoMatchingPeftModuleError``); so does jqlora, naming the modules there are."""
    from jqlora.lora.targets import available_modules_message, linear_modules, matches

    linear = linear_modules(params)
    if not any(matches(target_modules, dotted(p)) for p in linear):
        raise ValueError(
            f"{path}/{ADAPTER_CONFIG}: target_modules {target_modules!r} select no linear layer "
            f"of the model. {available_modules_message(linear)}"
        )


def _jqlora_config(config: dict):
    """The jqlora ``LoraConfig`` equivalent of a PEFT adapter config."""
    from jqlora.lora import LoraConfig

    target = config.get("target_modules")
    if target is None:
        raise ValueError("adapter_config.json sets no target_modules")
    init = config.get("init_lora_weights", True)
    return LoraConfig(
        r=int(config["r"]),
        alpha=config["lora_alpha"],
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=target if isinstance(target, str) else sorted(target),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        init="gaussian" if init == "gaussian" else "default",
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
    )
