"""Storing linear weights in 4 bits after the adapters have changed them (PiSSA, LoftQ, merge).

``quantization`` is any object with ``quant_type``, ``blocksize`` and ``double_quant``
attributes (``jqlora.QuantConfig``, which sits above this package); when it has a
``quantizes(module_name)`` method, the modules it leaves out stay in float.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp

from jqlora.lora.targets import Path, dotted, get_in, linear_modules, set_in
from jqlora.quant import QuantizedTensor, quantize


def quantize_as(w: jax.Array, quant, name: str) -> QuantizedTensor:
    """``w`` quantized with ``quant``'s settings; ``name`` labels errors."""
    return quantize(
        jnp.asarray(w), quant.quant_type, quant.blocksize, quant.double_quant, name=name
    )


def covers(quant, name: str) -> bool:
    """Whether ``quant`` stores the linear layer ``name`` in 4 bits."""
    quantizes = getattr(quant, "quantizes", None)
    return quantizes(name) if callable(quantizes) else True


def settings_of(weight):
    """The quantization settings of a ``QuantizedTensor`` (None for a plain array)."""
    if not isinstance(weight, QuantizedTensor):
        return None
    return types.SimpleNamespace(
        quant_type=weight.quant_type, blocksize=weight.blocksize, double_quant=weight.double_quant
    )


def quantize_linear(params: Mapping, quantization, skip: Iterable[Path] = ()) -> Mapping:
    """``params`` with every float linear weight ``quantization`` covers quantized.

    Weights already quantized, and the modules in ``skip``, are left as they are.
    """
    if quantization is None:
        return params
    skip = set(map(tuple, skip))
    for path in linear_modules(params):
        weight = get_in(params, path + ("weight",))
        if (
            path in skip
            or isinstance(weight, QuantizedTensor)
            or not covers(quantization, dotted(path))
        ):
            continue
        params = set_in(params, path + ("weight",), quantize_as(weight, quantization, dotted(path)))
    return params
