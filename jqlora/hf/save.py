"""`save_hf`: ``(model, params)`` -> a checkpoint directory transformers loads.

Float params are written as they are (GPT-2's Conv1D weights transposed back to ``[in,
out]``). With a ``QuantConfig`` every linear weight it covers is written in bitsandbytes'
4-bit serialization (packed codes plus ``.absmax``, ``.quant_map``, ``.nested_*`` and the
``quant_state`` entry) and config.json gets the ``quantization_config`` transformers reads.
Weights that are already ``QuantizedTensor`` are written as stored when they match the
config, and dequantized when no quantization is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp

from jqlora.hf import names as names_lib
from jqlora.hf import safetensors_io
from jqlora.hf.quant_config import QuantConfig
from jqlora.models import architecture, checkpoint_map
from jqlora.quant import QuantizedTensor, dequantize, quantize


def _float_dtype_name(flat: dict) -> str:
    for leaf in flat.values():
        if not isinstance(leaf, QuantizedTensor) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.dtype(leaf.dtype).name
    return "float32"


def hf_config_for(model, params_flat: dict, quantization: QuantConfig | None) -> dict:
    """The config.json of a saved model: the loaded config, with dtype and quantization updated."""
    config = dict(model.config.hf)
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = _float_dtype_name(params_flat)
    if not config.get("architectures"):  # a GGUF-read config leaves the class to save_hf
        config["architectures"] = [architecture(config["model_type"])]
    if quantization is not None:
        config["quantization_config"] = quantization.to_hf(config["dtype"])
    return config


def checkpoint_tensors(model, params: dict, quantization: QuantConfig | None) -> dict:
    """``{checkpoint name: array}``: what ``save_hf`` writes."""
    from jqlora.hf.bnb_io import bnb_tensors

    flat = names_lib.flatten(params)
    expected = names_lib.expected_params(model)
    ckpt = checkpoint_map(model.config.hf["model_type"])
    out = {}
    for name, leaf in flat.items():
        module = name.rpartition(".")[0]
        if (
            quantization is not None
            and expected.is_linear_weight(name)
            and quantization.quantizes(module)
        ):
            qt = leaf if isinstance(leaf, QuantizedTensor) else None
            if qt is not None and not _matches(qt, quantization):
                raise ValueError(
                    f"save_hf: {name} is stored as {qt}, not as {quantization}; dequantize it first or save with its settings"
                )
            if qt is None:
                qt = quantize(
                    leaf,
                    quantization.quant_type,
                    quantization.blocksize,
                    quantization.double_quant,
                    name=name,
                )
            out.update(bnb_tensors(name, qt))
            continue
        if isinstance(leaf, QuantizedTensor):
            leaf = dequantize(leaf)
        out[name] = leaf.T if ckpt.is_transposed(name) else leaf
    return out


def _matches(qt: QuantizedTensor, q: QuantConfig) -> bool:
    return (
        qt.quant_type == q.quant_type
        and qt.blocksize == q.blocksize
        and qt.double_quant == q.double_quant
    )


def save_hf(
    out_dir,
    model,
    params: dict,
    quantization: QuantConfig | None = None,
    *,
    max_shard_bytes: int = safetensors_io.MAX_SHARD_BYTES,
) -> Path:
    """Write ``config.json`` and safetensors (sharded above ``max_shard_bytes``, 5 GB) to
    ``out_dir`` so that ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.

    The directory appears only when complete (written to a temporary directory, then renamed).
    """
    out_dir = Path(out_dir)
    flat = names_lib.flatten(params)
    config = hf_config_for(model, flat, quantization)
    tensors = checkpoint_tensors(model, params, quantization)
    with safetensors_io.atomic_directory(out_dir) as tmp:
        writer = safetensors_io.ShardWriter(tmp, max_shard_bytes)
        for name, array in tensors.items():
            writer.add(name, array)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir
