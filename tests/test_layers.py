"""The library and the application in two places (DESIGN.md, "Layers"), and what importing
the library does to the process: nothing.

* No module of the library imports ``jqlora.app`` (the `jqlora` command and the finetune
  run), and no module of the application imports the package root ``jqlora`` for a name
  (it imports the module that defines it): read from the source with ``ast``.
* The modules of ``jqlora.app`` and ``jqlora.train`` import each other in no circle.
* ``import jqlora`` (and touching its public names) leaves malloc, ``XLA_FLAGS`` and every
  ``jax.config`` value as they were, and starts no JAX back end; ``jqlora --help`` and
  ``jqlora finetune --help`` do not even import JAX: each in a fresh process.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from fresh_process import run_python

ROOT = Path(__file__).resolve().parent.parent / "jqlora"
# The package root names ``finetune`` and ``FinetuneConfig`` lazily (jqlora/__init__.py),
# and ``python -m jqlora`` runs the command: the two files of the library allowed to.
FACADE = {"jqlora/__init__.py", "jqlora/__main__.py"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(module imported, line)`` for each import in ``path``; ``from X
    import Y`` counts as X.Y where X.Y is a module, else X; a string naming a module of
    jqlora counts as an import of it (``importlib.import_module(SUBCOMMANDS[name])``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if _is_module(sub) else base, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # a module named in a string is imported by name (importlib.import_module)
            name = node.value
            if name.startswith("jqlora.") and _is_module(name):
                found.append((name, node.lineno))
    return found


def _is_module(name: str) -> bool:
    path = ROOT.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        yield path, str(path.relative_to(ROOT.parent))


def test_the_library_never_imports_the_application():
    wrong = [
        f"{rel}:{line}: imports {name}"
        for path, rel in _sources()
        if not rel.startswith("jqlora/app/") and rel not in FACADE
        for name, line in _imports(path)
        if name == "jqlora.app" or name.startswith("jqlora.app.")
    ]
    assert not wrong, "\n".join(wrong)


def test_the_application_imports_names_from_their_modules_not_the_package_root():
    wrong = [
        f"{rel}:{line}: imports from the package root"
        for path, rel in _sources()
        if rel.startswith("jqlora/app/")
        for name, line in _imports(path)
        if name == "jqlora"
    ]
    assert not wrong, "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports in ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["jqlora.app", "jqlora.train"])
def test_no_import_cycles(package):
    """Counting every import, in functions too: a lazy import in a circle is still one."""
    modules = {_module_name(p): p for p, _ in _sources()}
    graph = {
        name: {m for m, _ in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
        if name == package or name.startswith(package + ".")
    }
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# Every jax.config value, XLA_FLAGS, mallopt calls (ctypes' audit events name each symbol
# looked up in a C library) and whether a back end started, before and after ``import
# jqlora`` and a touch of each public name; jax is imported first so that its own defaults
# are the "before".
_IMPORT_PROBE = """
import json, os, sys
looked_up = []
sys.addaudithook(lambda event, args: looked_up.append(str(args[1]))
                 if event == "ctypes.dlsym" else None)
import jax
from jax._src import xla_bridge
def snapshot():
    return {"config": {k: repr(v) for k, v in jax.config.values.items()},
            "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
            "backend": xla_bridge.backends_are_initialized()}
before = snapshot()
import jqlora
for name in jqlora.__all__:
    getattr(jqlora, name)
after = snapshot()
changed = sorted(k for k in before["config"] if before["config"][k] != after["config"].get(k))
print(json.dumps({"changed": changed, "new": sorted(set(after["config"]) - set(before["config"])),
                  "flags": [before["XLA_FLAGS"], after["XLA_FLAGS"]],
                  "backend": after["backend"], "mallopt": "mallopt" in looked_up}))
"""


def _import_probe(**env) -> dict:
    out = run_python(
        _IMPORT_PROBE,
        unset=("JQLORA_HOST_MALLOC", "JAX_CPU_ENABLE_ASYNC_DISPATCH"),
        XLA_FLAGS="--xla_cpu_use_thunk_runtime=true",
        JQLORA_XLA_FLAGS="1",  # the opt-in that `tune_cpu` would act on
        **env,
    )
    return json.loads(out.splitlines()[-1])


def test_import_jqlora_changes_nothing_in_the_process():
    seen = _import_probe()
    assert seen["changed"] == [] and seen["new"] == []
    assert seen["flags"] == ["--xla_cpu_use_thunk_runtime=true"] * 2
    assert seen["backend"] is False
    assert seen["mallopt"] is False


def test_the_import_probe_sees_tune_cpu():
    """The probe, with ``tune_cpu()`` run right after the import, sees its changes: so the
    test above would see them, were they made at import."""
    from jqlora import host_malloc

    code = _IMPORT_PROBE.replace("import jqlora\n", "import jqlora\njqlora.runtime.tune_cpu()\n")
    assert code != _IMPORT_PROBE
    out = run_python(
        code,
        unset=("JQLORA_HOST_MALLOC", "JAX_CPU_ENABLE_ASYNC_DISPATCH"),
        XLA_FLAGS="--xla_cpu_use_thunk_runtime=true",
        JQLORA_XLA_FLAGS="1",
    )
    tuned = json.loads(out.splitlines()[-1])
    assert tuned["flags"][1] != tuned["flags"][0]
    if host_malloc._glibc() is not None:
        assert tuned["mallopt"] is True
        assert "jax_cpu_enable_async_dispatch" in tuned["changed"]


_HELP_PROBE = """
import contextlib, io, json, sys
from jqlora.app.cli import main
for argv in (["--help"], ["finetune", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "torch"))))
"""


def test_help_imports_no_jax():
    """``jqlora --help`` and ``jqlora finetune --help`` import no JAX (so start no back end,
    and take no seconds to import it)."""
    imported = json.loads(run_python(_HELP_PROBE).splitlines()[-1])
    assert imported == []
