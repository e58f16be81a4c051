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
    """

    ignore: tuple[str, ...] = ()
    transposed: tuple[str, ...] = ()
    prefix: str = ""

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignore)

    def is_transposed(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.transposed)

    def param_name(self, name: str, expected) -> str:
        if name not in expected and self.prefix and not name.startswith(self.prefix):
            return self.prefix + name
        return name
