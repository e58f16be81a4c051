"""bitsandbytes 4-bit checkpoints: reading them without dequantizing, and the tensors to write.

In a transformers + bitsandbytes checkpoint a 4-bit linear weight ``W`` named ``x.weight``
is stored as::

    x.weight                                  uint8 [ceil(n/2), 1]  packed codes
    x.weight.absmax                           uint8 (double quant) or float32 [n_blocks]
    x.weight.quant_map                        float32 [16]          the NF4/FP4 book
    x.weight.nested_absmax                    float32               (double quant only)
    x.weight.nested_quant_map                 float32 [256]         (double quant only)
    x.weight.quant_state.bitsandbytes__<nf4|fp4>  uint8 JSON: shape, dtype, blocksize, nested_offset

``jqlora.quant.bnb_format`` converts between that dict and a ``QuantizedTensor``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jqlora.hf import names as names_lib
from jqlora.hf import safetensors_io
from jqlora.hf.convert import convert_tensor, progress_bar
from jqlora.models import checkpoint_map
from jqlora.quant import QuantizedTensor
from jqlora.quant.bnb_format import from_bnb, to_bnb

_SUFFIX = re.compile(
    r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$"
)


def bnb_tensors(name: str, qt: QuantizedTensor) -> dict:
    """``{checkpoint name: array}`` for the 4-bit weight ``name`` (e.g. ``...q_proj.weight``)."""
    return to_bnb(qt, prefix=name)


def split_name(ckpt_name: str) -> tuple[str, str]:
    """``("...q_proj.weight", "absmax")`` for ``...q_proj.weight.absmax``; ``(name, "weight")``
    for the packed codes and for every ordinary tensor."""
    m = _SUFFIX.search(ckpt_name)
    if m is None:
        return ckpt_name, "weight"
    return ckpt_name[: m.start()], m.group(1)


def load_prequantized(path: Path, model, dtype, progress=None) -> dict:
    """The params of a bitsandbytes 4-bit checkpoint: its 4-bit weights as ``QuantizedTensor``
    (bytes untouched), every other tensor cast to ``dtype``."""
    files = safetensors_io.checkpoint_files(path)
    infos = safetensors_io.tensor_infos(files)
    expected = names_lib.expected_params(model)
    ckpt = checkpoint_map(model.config.hf["model_type"])
    groups: dict[str, dict] = {}
    for name in infos:
        base, part = split_name(name)
        if ckpt.is_ignored(base) or (base == "lm_head.weight" and base not in expected.shapes):
            continue
        pname = ckpt.param_name(base, expected.shapes)
        if pname not in expected.shapes:
            raise ValueError(
                f"{infos[name][0]}: unexpected tensor {name!r} for model_type {model.config.hf['model_type']!r}"
            )
        groups.setdefault(pname, {})[part] = name
    missing = sorted(set(expected.shapes) - set(groups))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]} ({len(missing)} in all)")

    flat: dict[str, Any] = {}  # parameter name -> array or QuantizedTensor
    pending: dict[str, dict[str, Any]] = {}  # 4-bit parameter -> the parts read so far
    owner = {name: pname for pname, parts in groups.items() for name in parts.values()}
    with progress_bar(len(groups), f"loading {path.name}", progress) as bar:
        for name, file, array in safetensors_io.iter_tensors(files, list(owner)):
            pname = owner[name]
            parts = groups[pname]
            if len(parts) == 1:  # an ordinary float tensor
                flat[pname] = convert_tensor(
                    array,
                    pname,
                    expected,
                    None,
                    dtype,
                    transpose=ckpt.is_transposed(pname),
                    source=f"{file}: tensor {name!r}",
                )
                bar.update()
                continue
            got = pending.setdefault(pname, {})
            got[name] = array
            if len(got) == len(parts):
                flat[pname] = _quantized_leaf(pname, pending.pop(pname), expected, file)
                bar.update()
    return names_lib.unflatten(flat)


def _quantized_leaf(pname: str, parts: dict, expected, file) -> QuantizedTensor:
    if not expected.is_linear_weight(pname):
        raise ValueError(
            f"{file}: {pname!r} is stored in 4 bits but is not a linear layer's weight"
        )
    try:
        qt = from_bnb(parts, prefix=pname)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"{file}: tensor {pname!r}: not a valid bitsandbytes 4-bit weight ({e})"
        ) from None
    if tuple(qt.shape) != expected.shapes[pname]:
        raise ValueError(
            f"{file}: tensor {pname!r} has shape {tuple(qt.shape)}, but config.json implies {expected.shapes[pname]}"
        )
    return qt
