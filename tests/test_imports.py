"""The package's import structure (issue 26): the torch-free modules load without torch, the
module-level imports have no cycle, and the layers import only downwards."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "taskgroup"

TORCH_FREE = [
    "taskgroup.grouping",
    "taskgroup.locks",
    "taskgroup.config",
    "taskgroup.tasks",
    "taskgroup.groupings",
    "taskgroup.files",
    "taskgroup.data.fmuia",  # the reader: `taskgroup tasks --data` needs no torch
    "taskgroup.data.split",
    "taskgroup.matrices",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.stmt], module_level: bool) -> Iterator[ast.stmt]:
    """The import statements that run: at module level only (``module_level``; inside ``if`` and
    ``try`` too), or anywhere (functions and classes too); never those under ``if TYPE_CHECKING``."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _statements(node.body, module_level)
            yield from _statements(node.orelse, module_level)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _statements(block, module_level)
        elif isinstance(node, ast.With) or (
            not module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ):
            yield from _statements(node.body, module_level)
        elif not module_level and isinstance(node, ast.For | ast.While):
            yield from _statements(node.body, module_level)
            yield from _statements(node.orelse, module_level)


def imports(name: str, module_level: bool = True) -> set[str]:
    """The modules ``name`` imports: ``import a.b`` is ``a.b``; ``from a import b`` is ``a.b`` when
    that is a module of the package, else ``a``; relative imports resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(ast.parse(path.read_text()).body, module_level):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            found.add(sub if sub in MODULES else base)
    return found


def graph(module_level: bool = True) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    return {name: {m for m in imports(name, module_level) if m in MODULES} for name in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def offenders(inside: str, forbidden: tuple[str, ...], exempt: tuple[str, ...] = ()) -> list[str]:
    """``module -> import`` for every import (module level or in a function) by a module under
    ``inside`` (but not under ``exempt``) of a module under one of ``forbidden``."""

    def under(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return sorted(
        f"{name} -> {target}"
        for name in MODULES
        if under(name, (inside,)) and not under(name, exempt)
        for target in imports(name, module_level=False)
        if under(target, forbidden)
    )


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_import_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"import {module}: {result.stderr.strip().splitlines()[-1:]}"


@pytest.mark.parametrize("argv", [["--help"], ["tasks"]], ids=" ".join)
def test_commands_that_need_no_torch_do_not_import_it(argv):
    code = (
        "import sys\n"
        "from taskgroup.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"taskgroup {' '.join(argv)}: {result.stderr.strip().splitlines()[-1:]}"


def test_the_walk_resolves_relative_and_module_imports():
    assert "taskgroup.grouping.select" in imports("taskgroup.grouping.candidates")  # from-import of a module
    assert "taskgroup.grouping.partition" in imports("taskgroup.grouping")  # a package's own modules
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# imports inside a function that close a cycle on purpose: (importer, imported)
DELIBERATE_LAZY = {
    # the task-kind registry sits above the metrics; a metric asks it for its kind's entry
    ("taskgroup.metrics", "taskgroup.kinds"),
}


def test_no_import_cycle_counting_imports_in_functions():
    """A lazy import does not break a cycle (it only hides it from the interpreter until the
    function runs), so imports in functions count too, but for :data:`DELIBERATE_LAZY`."""
    edges = graph(module_level=False)
    for importer, imported in DELIBERATE_LAZY:
        if imported not in imports(importer):  # a module-level import is no exception
            edges[importer].discard(imported)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle (counting imports in functions): " + " -> ".join(cycle or [])


def test_grouping_imports_no_training_affinity_compare_models_or_torch():
    forbidden = ("taskgroup.training", "taskgroup.affinity", "taskgroup.compare", "taskgroup.models", "torch")
    assert offenders("taskgroup.grouping", forbidden) == []


def test_only_stages_and_the_cli_import_stages():
    assert offenders("taskgroup", ("taskgroup.stages",), exempt=("taskgroup.stages", "taskgroup.cli")) == []


def test_models_import_no_data():
    assert offenders("taskgroup.models", ("taskgroup.data",)) == []
