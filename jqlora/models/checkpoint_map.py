"""How a family's checkpoint tensor names differ from its params paths."""

from __future__ import annotations

import dataclasses
import re

__all__ = ["CheckpointMap"]


@dataclasses.dataclass(frozen=True)
class CheckpointMap:
    """How a family's checkpoint names differ from its params names (the identity by default).

    ignore: regexes of checkpoint tensors that are buffers, not params (e.g. rotary inv_freq).
    transposed: regexes of params stored ``[in, out]`` in checkpoints (GPT-2's Conv1D).
    prefix: prepended to checkpoint names that lack it (old GPT-2 files have ``h.0...``).
    renames: ``(regex, replacement)`` pairs applied to checkpoint names in turn (the text
      tower of a Gemma 3 image-text checkpoint: ``language_model.model.`` -> ``model.``).
    """

    ignore: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()
    prefix: str = ""
    renames: tuple[tuple[str, str], ...] = ()

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignore)

    def is_transposed(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.transposed)

    def param_name(self, name: str, expected) -> str:
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        if name not in expected and self.prefix and not name.startswith(self.prefix):
            return self.prefix + name
        return name
