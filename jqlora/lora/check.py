"""`check_lora`: does a lora tree fit a params tree? A clear error naming the module if not.

Shapes only, so it runs on traced values and inside ``jit`` as well as on loaded arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from jqlora.lora.spec import LoraSpec
from jqlora.lora.targets import Path, dotted, is_linear_weight, weight_dims

_REQUIRED = ("a", "b", "spec")
_ALLOWED = frozenset(_REQUIRED + ("magnitude",))


def adapters(lora: Mapping, prefix: Path = ()) -> list[tuple[Path, Mapping]]:
    """``(path, entry)`` for every adapter entry (a dict holding ``"a"``) in ``lora``."""
    found = []
    for key, sub in lora.items():
        if not isinstance(sub, Mapping):
            raise ValueError(
                f"lora tree: {dotted(prefix + (str(key),))!r} is a {type(sub).__name__}, not an adapter "
                "entry {'a', 'b', 'spec'} or a dict of them"
            )
        if "a" in sub:
            found.append((prefix + (str(key),), sub))
        else:
            found.extend(adapters(sub, prefix + (str(key),)))
    return found


def check_lora(params: Mapping, lora: Mapping) -> None:
    """Raise ``ValueError`` unless every adapter in ``lora`` fits its layer in ``params``.

    Each entry must sit at the path of a linear layer ``W`` [out, in] and hold
    ``a`` [r, in], ``b`` [out, r] (floating), a ``LoraSpec`` ``spec``, and with DoRA
    ``magnitude`` [out]; nothing else.
    """
    for path, entry in adapters(lora):
        name = dotted(path)
        missing = [k for k in _REQUIRED if k not in entry]
        extra = sorted(set(entry) - _ALLOWED)
        if missing or extra:
            problems = "; ".join(
                f"{what} {keys}"
                for what, keys in (("missing", missing), ("unexpected", extra))
                if keys
            )
            raise ValueError(
                f"lora entry {name!r}: {problems}; expected keys {sorted(_ALLOWED)} ('magnitude' only with DoRA)"
            )
        if not isinstance(entry["spec"], LoraSpec):
            raise ValueError(
                f"lora entry {name!r}: 'spec' is a {type(entry['spec']).__name__}, not a LoraSpec"
            )
        module = params
        for i, key in enumerate(path):
            if not isinstance(module, Mapping) or key not in module:
                where = dotted(path[:i]) or "the top level"
                options = sorted(module) if isinstance(module, Mapping) else []
                raise ValueError(
                    f"lora entry {name!r} has no module in params: no {key!r} under {where} "
                    f"(there: {options})"
                )
            module = module[key]
        weight = module.get("weight") if isinstance(module, Mapping) else None
        if weight is None or not is_linear_weight(weight):
            raise ValueError(
                f"lora entry {name!r}: params has no linear 'weight' [out, in] at that path"
            )
        lead, out_f, in_f = weight_dims(weight)
        a, b = entry["a"], entry["b"]
        for k, arr in (("a", a), ("b", b)):
            if getattr(arr, "ndim", None) != 2 + len(lead) or not jnp.issubdtype(
                arr.dtype, jnp.floating
            ):
                raise ValueError(
                    f"lora entry {name!r}: {k!r} must be a {2 + len(lead)}-D float array for a weight of "
                    f"shape {(*lead, out_f, in_f)}, got {getattr(arr, 'shape', None)} "
                    f"{getattr(arr, 'dtype', type(arr).__name__)}"
                )
        r = a.shape[-2]
        if tuple(a.shape) != (*lead, r, in_f) or tuple(b.shape) != (*lead, out_f, r):
            raise ValueError(
                f"lora entry {name!r}: a {tuple(a.shape)} and b {tuple(b.shape)} do not fit the weight "
                f"{(*lead, out_f, in_f)} [out={out_f}, in={in_f}]; expected a {(*lead, 'r', in_f)} and "
                f"b {(*lead, out_f, 'r')} with the same r"
            )
        if "magnitude" in entry and tuple(entry["magnitude"].shape) != (*lead, out_f):
            raise ValueError(
                f"lora entry {name!r}: DoRA magnitude has shape {tuple(entry['magnitude'].shape)}, "
                f"expected {(*lead, out_f)}"
            )
