"""`LoraConfig`: which linear layers get an adapter, of what rank, scale and initialization.

The fields and their meaning follow PEFT's ``LoraConfig`` (peft 0.21) so that an adapter
trained here is the adapter PEFT would build from the same configuration:

* ``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (``use_rslora``);
* ``target_modules``: ``"all-linear"`` (every linear layer but ``lm_head``), a list of
  module names (a module is targeted when its dotted path equals a name or ends with
  ``"." + name``), or a regular expression that must match the whole dotted path;
* ``rank_pattern`` / ``alpha_pattern``: ``{key: value}``; the first key (in dict order)
  for which ``re.match(rf"(.*\\.)?({key})$", path)`` succeeds overrides ``r`` / ``alpha``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

ALL_LINEAR = "all-linear"
# The classic LoRA setting (Hu et al. 2021): the query and value projections only.
# GPT-2 fuses q, k and v into one ``c_attn`` layer; target it instead there.
ATTENTION_ONLY = ("q_proj", "v_proj")

_INITS = ("default", "gaussian", "pissa", "loftq")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Configuration of the LoRA adapters of a model (PEFT semantics, see module doc).

    r: rank of every adapter (unless ``rank_pattern`` says otherwise); > 0.
    alpha: numerator of the scale; > 0.
    dropout: rate of the dropout applied to the LoRA branch's input; in [0, 1).
    target_modules: ``"all-linear"``, a sequence of module names, or a regex string.
    use_rslora: scale = alpha / sqrt(r) instead of alpha / r.
    use_dora: weight-decomposed LoRA; each adapter also trains a magnitude vector [out].
    init: ``"default"`` (A kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, std 1/r), B
      zero), ``"pissa"`` / ``"pissa_niter_N"`` (principal singular vectors; exact
      or randomized SVD with N subspace iterations) or ``"loftq"`` (alternating
      quantization and SVD). The last two change the base weight: use
      ``init_lora_from_base`` for them.
    rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha``.
    loftq_iter: alternating steps of LoftQ (PEFT's ``LoftQConfig.loftq_iter``); >= 1.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | Sequence[str] = ALL_LINEAR
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    loftq_iter: int = 1

    def __post_init__(self):
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("LoraConfig: target_modules is an empty string")
            if targets.lower() != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as e:
                    raise ValueError(
                        f"LoraConfig: target_modules {targets!r} is not a valid regex: {e}"
                    ) from None
        else:
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    f"LoraConfig: target_modules must be 'all-linear', a regex, or a non-empty list of "
                    f"module names; got {self.target_modules!r}"
                )
            object.__setattr__(self, "target_modules", targets)
        if self.init not in _INITS and not _PISSA_NITER.fullmatch(str(self.init)):
            raise ValueError(
                f"LoraConfig: unknown init {self.init!r}; expected one of {_INITS} or 'pissa_niter_N'"
            )
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        if not (isinstance(self.loftq_iter, int) and self.loftq_iter >= 1):
            raise ValueError(
                f"LoraConfig: loftq_iter must be an integer >= 1, got {self.loftq_iter!r}"
            )

    def __hash__(self):  # the pattern dicts are not hashable; a config may be a static jit argument
        fields = dataclasses.astuple(self)
        return hash(tuple(tuple(f.items()) if isinstance(f, dict) else f for f in fields))

    @classmethod
    def attention_only(cls, modules: Sequence[str] = ATTENTION_ONLY, **kwargs) -> LoraConfig:
        """The classic LoRA setting: adapters on the query and value projections only.

        Pass ``modules=("c_attn",)`` for GPT-2, whose q/k/v projections are one layer.
        """
        return cls(target_modules=tuple(modules), **kwargs)

    @property
    def changes_base(self) -> bool:
        """True for inits (PiSSA, LoftQ) that move part of the base weight into the adapter."""
        return self.init == "loftq" or str(self.init).startswith("pissa")

    @property
    def pissa_niter(self) -> int | None:
        """Subspace iterations of a randomized-SVD PiSSA (``"pissa_niter_N"``), else None."""
        m = _PISSA_NITER.fullmatch(str(self.init))
        return int(m.group(1)) if m else None

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """``(r, alpha)`` of the module at dotted ``path``, after rank/alpha patterns (PEFT's rule)."""
        r = (
            self.rank_pattern[k]
            if (k := _pattern_key(self.rank_pattern, path)) is not None
            else self.r
        )
        alpha = (
            self.alpha_pattern[k]
            if (k := _pattern_key(self.alpha_pattern, path)) is not None
            else self.alpha
        )
        return r, alpha

    def scale(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: Mapping[str, object], path: str) -> str | None:
    """The first key of ``patterns`` that matches ``path`` as peft's ``get_pattern_key`` does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _check_rank(name: str, r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoraConfig: {name} must be a positive integer, got {r!r}")


def _check_alpha(name: str, alpha) -> None:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not alpha > 0
        or not math.isfinite(alpha)
    ):
        raise ValueError(f"LoraConfig: {name} must be a positive number, got {alpha!r}")
