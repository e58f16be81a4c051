"""`merge_lora`: fold the adapters into the base weights; no LoRA branch left at inference.

For each adapted layer, in float32 from the dequantized weight (as PEFT merges into a
4-bit base: dequantize, add, and only then store)::

    W' = W + s B A                                     (LoRA)
    W' = m / ||W + s B A||_row * (W + s B A)            (DoRA, as PEFT's merge)

The merged model computes what the unmerged one does, up to the rounding of ``W'`` to
the output dtype. Re-quantizing ``W'`` to 4 bits is possible but lossy: the adapter moves
a weight by far less than NF4's rounding step, so much of what it learned is rounded away.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jqlora.lora.check import adapters, check_lora
from jqlora.lora.dora import delta_weight, float_weight, merged_dora_weight
from jqlora.lora.storage import quantize_as, quantize_linear
from jqlora.lora.targets import dotted, get_in, set_in
from jqlora.quant import QuantizedTensor, dequantize


def merge_lora(params: Mapping, lora: Mapping, *, dtype=None, requantize=None) -> dict:
    """Plain params with every adapter of ``lora`` folded into its weight (see module doc).

    dtype: dtype of the result's float leaves; default: each weight's own dtype (a
      quantized weight's original dtype).
    requantize: None, for a plain float tree (every ``QuantizedTensor`` is dequantized);
      or a ``QuantConfig``: the merged weights, and the other float linear weights it
      covers, are quantized with it (with a warning: lossy); weights already in 4 bits
      stay as they are.
    """
    check_lora(params, lora)
    merged: Mapping = params
    paths = []
    for path, entry in adapters(lora):
        weight = get_in(params, path + ("weight",))
        if "magnitude" in entry:
            w = merged_dora_weight(weight, entry)
        else:
            w = float_weight(weight) + delta_weight(entry)
        w = w.astype(dtype or weight.dtype)
        stored: jax.Array | QuantizedTensor = w
        if requantize is not None:
            stored = quantize_as(w, requantize, dotted(path))
        merged = set_in(merged, path + ("weight",), stored)
        paths.append(path)
    if requantize is not None:
        warnings.warn(
            "merge_lora(requantize=...): re-quantizing merged weights is lossy; the adapter's "
            "update is much smaller than the 4-bit rounding step and is partly erased. Keep the "
            "merged weights in float (requantize=None), or keep the adapter separate, to keep it.",
            UserWarning,
            stacklevel=2,
        )
        return _cast(quantize_linear(merged, requantize, skip=paths), dtype)
    return _cast(merged, dtype, dequantize_all=True)


def _cast(tree, dtype, dequantize_all: bool = False):
    """``tree`` with float arrays cast to ``dtype`` (if given) and, if asked, every 4-bit weight dequantized."""
    if isinstance(tree, Mapping):
        return {k: _cast(v, dtype, dequantize_all) for k, v in tree.items()}
    if isinstance(tree, QuantizedTensor):
        return dequantize(tree, dtype or tree.dtype) if dequantize_all else tree
    if dtype is not None and jnp.issubdtype(getattr(tree, "dtype", jnp.int32), jnp.floating):
        return tree.astype(dtype)
    return tree
