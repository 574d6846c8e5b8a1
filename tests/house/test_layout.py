"""The house rules that code review alone cannot keep: no import cycles, modules of a readable size,
`prune` built on attnprobe's public names only, and old import paths that warn and still work."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("attnprobe", "prune")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Every module of the two packages: dotted name → file (a package is its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project's modules that ``path`` imports at run time (also inside functions).

    Imports under ``if TYPE_CHECKING:`` run only for type checkers and are left out. ``from pkg import
    x`` depends on ``pkg.x`` where that is a module, else on ``pkg`` itself.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                deps.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        deps.add(full)
                    elif base in modules:
                        deps.add(base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    deps.discard(name)
    return deps


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imported(path, name, modules) for name, path in modules.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_no_module_over_the_size_limit():
    long = {
        name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_prune_uses_only_attnprobes_public_names():
    import attnprobe

    public = set(attnprobe.__all__)
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("prune"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnprobe"):
                if node.module != "attnprobe" or {a.name for a in node.names} - public:
                    offenders.append(f"{name}: from {node.module} import {[a.name for a in node.names]}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("attnprobe.") for a in node.names):
                offenders.append(f"{name}: import {[a.name for a in node.names]}")
    assert not offenders, "prune imports attnprobe internals:\n" + "\n".join(offenders)


def test_prune_imports_no_private_name_of_another_module():
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("prune"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                if private:
                    offenders.append(f"{name}: from {node.module} import {private}")
    assert not offenders, "\n".join(offenders)


def test_attnprobe_exports_names_not_modules():
    import types

    import attnprobe

    modules = [n for n in attnprobe.__all__ if isinstance(getattr(attnprobe, n), types.ModuleType)]
    assert not modules, f"attnprobe.__all__ exports whole modules: {modules}"


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("attnprobe.sinks", "attnprobe.analysis.sinks", "sink_scores"),
        ("attnprobe.record", "attnprobe.recording.record", "active_recording"),
        ("attnprobe.store_writer", "attnprobe.store.writer", "StoreWriter"),
        ("prune.wanda", "prune.methods.wanda", "wanda_scores"),
        ("prune.apply", "prune.engine.apply", "PruneResult"),
        ("prune.io", "prune.export.mask_files", "save_masks"),
    ],
)
def test_old_import_paths_warn_and_work(old, new, name):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_old_module_names_do_not_hide_the_public_functions():
    import attnprobe
    import prune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from attnprobe.record import active_recording  # noqa: F401  (the old module path)
        from prune.apply import PruneResult  # noqa: F401
    assert callable(attnprobe.record) and not isinstance(attnprobe.record, type(sys))
    assert callable(prune.apply) and not isinstance(prune.apply, type(sys))


def test_old_module_paths_still_run_with_python_m():
    import importlib.util

    import prune  # noqa: F401  (registers the old paths)

    spec = importlib.util.find_spec("prune.harness")  # what `python -m prune.harness` runs
    assert spec.name == "prune.harness"
    assert spec.origin.endswith(("prune/evaluation/harness.py", "prune\\evaluation\\harness.py"))
