"""GGUF metadata <-> transformers config, through the key tables of ``gguf_arch``.

Reading (``gguf_config``): each ``{arch}.*`` key the file holds sets its config key, the rest
get transformers' defaults (``AutoConfig.for_model``), as in transformers' GGUF loader.
Writing (``gguf_hparams``): each config key, with those defaults filled in, is written as its
GGUF key (``float`` as F32, ``int`` as U32), plus what llama.cpp needs beyond the table: the
key/value head size where it is not ``hidden / heads``, the RoPE scaling, for ``llama3`` RoPE
the ``rope_freqs`` tensor (llama.cpp divides each frequency by its entry), Phi-3's rotated
dimensions ``head_dim * partial_rotary_factor`` (read back as that factor), and Gemma 3's
sliding-layer RoPE base (``rope.freq_base_swa``; the global layers' is ``rope.freq_base``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np

from jqlora.hf.gguf_arch import COMMON_KEYS, GGUF_ARCHITECTURES, GGUFArch
from jqlora.models import rope as rope_lib

_REQUIRED = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
# (key, value, GGUF value type), the key with "{arch}" filled in
KeyValue = tuple[str, object, gguf.GGUFValueType]
_U32, _F32, _STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING


def field(reader, key, default=None):
    """The value of a GGUF metadata field, or ``default`` when the file lacks it."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture_of(reader, path: Path) -> GGUFArch:
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return GGUF_ARCHITECTURES[arch]


def gguf_config(reader, path: Path) -> dict:
    """The transformers config (as config.json holds it) that the GGUF metadata describes."""
    from transformers import AutoConfig

    arch = architecture_of(reader, path)
    name = arch.name
    missing = [k for k in _REQUIRED if field(reader, f"{name}.{k}") is None]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {name}.{missing[0]}")
    kwargs = {}
    for key, hf_key in {**COMMON_KEYS, **arch.keys}.items():
        value = field(reader, f"{name}.{key}")
        if value is not None:
            kwargs[hf_key] = float(np.float32(value)) if isinstance(value, float) else value
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    kwargs.setdefault("vocab_size", int(embed.shape[-1]))
    kwargs["tie_word_embeddings"] = "output.weight" not in names
    for hf_key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            kwargs[hf_key] = int(value)
    rotary = field(reader, f"{name}.rope.dimension_count")
    if name == "phi3" and rotary is not None:
        head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if rotary != head_dim:
            kwargs["partial_rotary_factor"] = rotary / head_dim
    scaling = field(reader, f"{name}.rope.scaling.type")
    if scaling == "linear":  # Gemma 3 4B+: on the global layers (transformers applies it so)
        factor = float(np.float32(field(reader, f"{name}.rope.scaling.factor", 1.0)))
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling not in (None, "none") or "rope_factors_long.weight" in names:
        raise ValueError(f"{path}: GGUF rope scaling {scaling or 'longrope'!r} is not supported")
    try:
        config = AutoConfig.for_model(arch.model_type, **kwargs).to_dict()
    except Exception as e:  # transformers' config validation raises several kinds
        raise ValueError(f"{path}: GGUF metadata is not a valid {name} config ({e})") from None
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"):
        config.pop(key, None)  # transformers' bookkeeping; save_hf names the class
    return config


def _ropes(hf: dict) -> tuple[dict, dict | None]:
    """``(rope, sliding-layer rope or None)``: Gemma 3 has one per layer type."""
    if hf.get("model_type") == "gemma3_text":
        from jqlora.models.gemma import gemma3_ropes

        ropes = gemma3_ropes(hf)
        return ropes["full_attention"], ropes["sliding_attention"]
    return rope_lib.rope_parameters(hf), None


def _filled(hf: dict) -> dict:
    """``hf`` with the defaults transformers fills in for the keys GGUF needs."""
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window")
    if hf.get("model_type") in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    rope, _ = _ropes(hf)
    return {
        **hf,
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope["rope_theta"]),
        "sliding_window": window,
    }


def gguf_hparams(arch: GGUFArch, hf: dict) -> tuple[list[KeyValue], dict[str, np.ndarray]]:
    """The ``{arch}.*`` keys llama.cpp reads for a model of config ``hf``, and extra tensors."""
    att, rope = gguf.Keys.Attention, gguf.Keys.Rope
    c = _filled(hf)
    keys: dict[str, tuple[object, gguf.GGUFValueType]] = {}
    for key, hf_key in {**COMMON_KEYS, **arch.keys}.items():
        value = c.get(hf_key)
        if value is not None:
            keys[f"{{arch}}.{key}"] = (value, _F32 if isinstance(value, float) else _U32)
    if c["head_dim"] != c["hidden_size"] // c["num_attention_heads"]:
        keys[att.KEY_LENGTH] = keys[att.VALUE_LENGTH] = (c["head_dim"], _U32)
    if arch.name == "phi3":  # partial rotary: llama.cpp rotates the first n_rot dims
        rotary = c["head_dim"] * c.get("partial_rotary_factor", 1.0)
        keys[rope.DIMENSION_COUNT] = (int(rotary), _U32)
    if arch.name.startswith("gemma") and c.get("query_pre_attn_scalar", 256) != c["head_dim"]:
        warnings.warn(
            "GGUF export: query_pre_attn_scalar differs from head_dim; llama.cpp scales q.k "
            "by head_dim^-1/2 (hidden/heads for 27B models), so its outputs may differ",
            UserWarning,
            stacklevel=3,
        )
    p, sliding = _ropes(hf)
    if sliding is not None:  # Gemma 3's local layers
        keys[rope.FREQ_BASE_SWA] = (float(sliding["rope_theta"]), _F32)
    extra: dict[str, np.ndarray] = {}
    kind = p["rope_type"]
    if kind in ("linear", "yarn"):
        keys[rope.SCALING_TYPE] = (kind, _STR)
        keys[rope.SCALING_FACTOR] = (float(p["factor"]), _F32)
    if kind == "yarn":
        keys[rope.SCALING_ORIG_CTX_LEN] = (int(p["original_max_position_embeddings"]), _U32)
        for hf_key, key in (
            ("attention_factor", rope.SCALING_YARN_ATTN_FACTOR),
            ("beta_fast", rope.SCALING_YARN_BETA_FAST),
            ("beta_slow", rope.SCALING_YARN_BETA_SLOW),
        ):
            if p.get(hf_key) is not None:
                keys[key] = (float(p[hf_key]), _F32)
    elif kind == "llama3":
        base, _ = rope_lib.static_inv_freq(dict(p, rope_type="default"), c["head_dim"], 0)
        scaled, _ = rope_lib.static_inv_freq(p, c["head_dim"], c["max_position_embeddings"])
        extra["rope_freqs.weight"] = (base / scaled).astype(np.float32)
    elif kind not in ("default", "linear"):
        raise ValueError(f"GGUF export: RoPE type {kind!r} has no llama.cpp equivalent")
    window = c["sliding_window"]
    if window is not None and att.SLIDING_WINDOW not in keys:
        keys[att.SLIDING_WINDOW] = (int(window), _U32)
        warnings.warn(
            f"GGUF export: the model attends within a sliding window of {window} tokens; "
            f"llama.cpp's {arch.name} architecture ignores the window, so past that many "
            "tokens its outputs differ from the model's",
            UserWarning,
            stacklevel=3,
        )
    return [(k, v, t) for k, (v, t) in keys.items()], extra
