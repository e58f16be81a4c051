"""`init_lora`: a fresh adapter tree for the layers a `LoraConfig` targets.

For a targeted layer with weight ``W`` [out, in], rank ``r`` and scale ``s``, as PEFT
initializes it:

* ``"default"``: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (torch's ``kaiming_uniform_(a=sqrt(5))``
  on a [r, in] matrix: gain ``sqrt(2 / (1 + 5))``, bound ``gain * sqrt(3 / in)``), ``B = 0``;
* ``"gaussian"``: ``A ~ N(0, (1/r)^2)``, ``B = 0``;
* DoRA adds ``magnitude = ||W + s B A||_row`` (= ``||W||_row`` since B = 0), computed from
  the dequantized weight in float32.

B = 0 makes the adapted model equal the base at step 0. Each layer's key is
``fold_in(key, crc32(path))``, so a layer's adapter does not depend on which other layers
are targeted.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jqlora.lora.config import LoraConfig
from jqlora.lora.dora import weight_norm
from jqlora.lora.spec import LoraSpec
from jqlora.lora.targets import Path, dotted, get_in, select_targets, set_in, weight_dims
from jqlora.quant import QuantizedTensor


def layer_key(key: jax.Array, path: Path) -> jax.Array:
    """The PRNG key of the layer at ``path``: independent of the other layers targeted."""
    return jax.random.fold_in(key, zlib.crc32(dotted(path).encode()) & 0x7FFFFFFF)


def target_layers(
    params: Mapping, config: LoraConfig
) -> list[tuple[Path, jax.Array | QuantizedTensor, int, LoraSpec]]:
    """``(path, weight, r, spec)`` for every targeted layer; checks r against its shape."""
    layers = []
    for path in select_targets(params, config):
        weight = get_in(params, path + ("weight",))
        r, alpha = config.rank_and_alpha(dotted(path))
        _, out_f, in_f = weight_dims(weight)
        if r > min(out_f, in_f):
            raise ValueError(
                f"LoRA rank r={r} for {dotted(path)!r} exceeds the layer's smaller dimension "
                f"(weight [out={out_f}, in={in_f}]); a rank above min(out, in) adds parameters "
                f"but no expressiveness. Lower r, or set rank_pattern={{{path[-1]!r}: ...}}."
            )
        layers.append(
            (path, weight, r, LoraSpec(scale=config.scale(r, alpha), dropout=float(config.dropout)))
        )
    return layers


def init_a(key: jax.Array, shape: tuple[int, ...], init: str, dtype=jnp.float32) -> jax.Array:
    """A ``[*lead, r, in]`` as PEFT draws it for ``init`` ("default" or "gaussian")."""
    *_, r, in_features = shape
    if init == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) / r).astype(dtype)
    bound = 1.0 / jnp.sqrt(jnp.float32(in_features))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def make_adapter(
    a: jax.Array, b: jax.Array, spec: LoraSpec, weight=None, use_dora: bool = False
) -> dict:
    """One entry of the lora tree; with DoRA, the magnitude ``||W + s B A||_row`` of ``weight``."""
    adapter = {"a": a, "b": b, "spec": spec}
    if use_dora:
        adapter["magnitude"] = weight_norm(weight, adapter).astype(a.dtype)
    return adapter


def init_lora(key: jax.Array, params: Mapping, config: LoraConfig, *, dtype=jnp.float32) -> dict:
    """The lora tree for ``params``: ``{path: {"a": [r, in], "b": [out, r], "spec": LoraSpec}}``.

    A stacked weight ``[*lead, out, in]`` gets ``a [*lead, r, in]``, ``b [*lead, out, r]``.
    Paths mirror the targeted modules' paths in ``params`` (``magnitude`` [out] added with
    DoRA). ``dtype`` is the adapters' storage dtype (float32 keeps the optimizer exact;
    the forward casts to the compute dtype). PiSSA and LoftQ move part of the base weight
    into the adapter, so they need ``init_lora_from_base`` instead.
    """
    if config.changes_base:
        raise ValueError(
            f"init={config.init!r} rewrites the base weights (base = W - s B A); call "
            "jqlora.lora.init_lora_from_base(key, params, config, quantization=...) to get both trees"
        )
    lora: dict = {}
    for path, weight, r, spec in target_layers(params, config):
        lead, out_f, in_f = weight_dims(weight)
        a = init_a(layer_key(key, path), (*lead, r, in_f), config.init, dtype)
        b = jnp.zeros((*lead, out_f, r), dtype)
        lora = set_in(lora, path, make_adapter(a, b, spec, weight, config.use_dora))
    return lora
