"""Finding the linear layers of a params tree and the ones a `LoraConfig` targets.

A module is named by its dotted path in the params tree, which is its Hugging Face module
name (``model.layers.0.self_attn.q_proj``), so PEFT's matching rules apply unchanged.
A module is a *linear layer* when its subtree holds a ``weight`` of at least 2 dimensions
(a plain array or a ``QuantizedTensor``), and it is not an embedding table
(``embed_tokens``, ``embed_positions``, GPT-2's ``wte`` / ``wpe``): those hold 2-D weights
too, but are looked up, not multiplied. A weight ``[*lead, out, in]`` with leading axes is
a stack of layers (``nn.scan`` over layers); its adapters carry the same leading axes.
In a stack, a norm's scale is 2-D as well, so norms (``*norm*``, GPT-2's ``ln_*``) are
never linear layers either.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from jqlora.lora.config import ALL_LINEAR, LoraConfig
from jqlora.quant import QuantizedTensor

Path = tuple[str, ...]

# Output embeddings stay out of "all-linear", as in PEFT (and QLoRA).
OUTPUT_HEADS = ("lm_head",)
_EMBEDDING = re.compile(r"(.*_)?(embed|embeddings|wte|wpe)(_.*)?")
_NORM = re.compile(r".*norm.*|ln(_.*)?")


def dotted(path: Path) -> str:
    return ".".join(path)


def get_in(tree, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def set_in(tree: Mapping, path: Path, value) -> dict:
    """A copy of ``tree`` with ``tree[path] = value``; only the dicts along ``path`` are copied."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = set_in(tree.get(path[0], {}), path[1:], value)
    return out


def weighted_modules(params: Mapping, prefix: Path = ()) -> Iterator[tuple[Path, object]]:
    """``(path, weight)`` for every subtree of ``params`` that holds a ``"weight"``, in tree order."""
    for key, sub in params.items():
        if key == "weight" and prefix:
            yield prefix, sub
        elif isinstance(sub, Mapping):
            yield from weighted_modules(sub, prefix + (str(key),))


def is_embedding(path: Path) -> bool:
    return bool(path) and _EMBEDDING.fullmatch(path[-1]) is not None


def is_norm(path: Path) -> bool:
    return bool(path) and _NORM.fullmatch(path[-1].lower()) is not None


def is_linear_weight(weight) -> bool:
    return isinstance(weight, QuantizedTensor) or getattr(weight, "ndim", 0) >= 2


def weight_dims(weight) -> tuple[tuple[int, ...], int, int]:
    """``(lead, out, in)`` of a weight ``[*lead, out, in]``."""
    *lead, out_f, in_f = (int(d) for d in weight.shape)
    return tuple(lead), out_f, in_f


def linear_modules(params: Mapping) -> list[Path]:
    """Paths of every linear layer in ``params`` (see module doc), in tree order."""
    return [
        p
        for p, w in weighted_modules(params)
        if is_linear_weight(w) and not is_embedding(p) and not is_norm(p)
    ]


def matches(target_modules, path: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a concrete list / regex of targets."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return path in target_modules or any(path.endswith("." + t) for t in target_modules)


def select_targets(params: Mapping, config: LoraConfig) -> list[Path]:
    """Paths of the linear layers ``config.target_modules`` selects; a clear error if none.

    A name or regex that selects a module that is not a linear layer (an embedding, a
    norm) is an error rather than silently skipped: the adapter the user asked for would
    not exist.
    """
    linear = linear_modules(params)
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        chosen = [p for p in linear if p[-1] not in OUTPUT_HEADS]
    else:
        linear_set = set(linear)
        chosen = []
        for path, weight in weighted_modules(params):
            if not matches(targets, dotted(path)):
                continue
            if path not in linear_set:
                kind = (
                    "an embedding"
                    if is_embedding(path)
                    else f"not a linear layer (weight {_describe(weight)})"
                )
                raise ValueError(
                    f"target_modules={targets!r} selects module {dotted(path)!r}, which is {kind}; "
                    f"LoRA applies to linear layers only"
                )
            chosen.append(path)
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} matched no linear layer. {available_modules_message(linear)}"
        )
    return chosen


def check_target_names(target_modules, linear: list[Path]) -> None:
    """Stricter than PEFT, for command lines: each name of a target list must select at least
    one of the ``linear`` layers (PEFT only needs the list as a whole to select one), since a
    name that selects nothing is a typo that would silently train fewer adapters. A regex
    must select one layer; ``"all-linear"`` always passes. A ValueError names what is wrong."""
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return
        unmatched = (
            [] if any(matches(target_modules, dotted(p)) for p in linear) else [target_modules]
        )
    else:
        unmatched = [t for t in target_modules if not any(matches((t,), dotted(p)) for p in linear)]
    if unmatched:
        raise ValueError(
            f"target module(s) {', '.join(map(repr, unmatched))} select no linear layer. "
            f"{available_modules_message(linear)}"
        )


def available_modules_message(linear: list[Path]) -> str:
    """What a user needs to fix a target pattern: the module names and a few full paths."""
    if not linear:
        return "The params tree holds no linear layer (no 'weight' of 2 or more dimensions)."
    names = sorted({p[-1] for p in linear})
    examples = ", ".join(dotted(p) for p in linear[:4])
    return (
        f"Linear module names available: {names} ({len(linear)} layers, e.g. {examples}). "
        "A list entry matches a module whose dotted path equals it or ends with '.' + it; "
        "a string is a regex that must match the whole dotted path."
    )


def _describe(weight) -> str:
    shape = getattr(weight, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(weight).__name__
