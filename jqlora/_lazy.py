"""Names of a package that load on first use (PEP 562), so that importing the package
imports none of its modules: ``import jqlora`` and the `jqlora` command's ``--help``
stay free of JAX until something is used."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping


def lazy_names(
    package: str, exports: Mapping[str, str], globals_: dict
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each name to the module
    that defines it; a name is imported from there on first use and kept. Any other name
    is tried as a submodule (``jqlora.lora.targets`` after ``import jqlora``)."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f"{package}.{name}")
        value = getattr(importlib.import_module(module), name)
        globals_[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals_) | set(exports))

    return __getattr__, __dir__
