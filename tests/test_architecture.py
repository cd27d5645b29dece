"""The architecture, checked: no import cycle, arrows that point down, a neutral core, short functions, no torch on
the device.

Everything but the last test reads the source with the AST: nothing is imported and nothing starts, so the file
runs in well under a second. The checks are plain functions over a source tree; the last tests run each of them on
a small tree that breaks its rule, so none of them can pass by finding nothing.

Which imports count: every ``import`` and ``from ... import`` statement anywhere in a module: at the top, inside a
function (a lazy import), and under ``if TYPE_CHECKING:``. A TYPE_CHECKING import does not run, but it is a
dependency of the design all the same (the type checker follows it, and a reader must know that module to read
this one), so it counts for cycles and for direction both: where a room needs a type from above, it declares a
``Protocol`` of what it uses (e.g. :class:`edge_runtime.serve.servicer.ServedModels`). Not counted: the parent
packages Python runs first (``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__``; every module would otherwise
"import" its own package), and module names in strings (``importlib.import_module``).
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_TOP_LEVEL = {"build", "dist", "site"}
"""Build outputs at the top of the repository (copies of the packages), never sources."""

CORE = "edgeloop_core"
ABOVE_CORE = ("edge_runtime", "components", "pipelines", "telemetry_hub", "edgeloop", "bench", "tests")
"""What the neutral core must not import: everything that imports it."""
KEPT_FROM_EDGE = ("components", "telemetry_hub", "pipelines")
"""The cloud side and the hub share the core with the device, never the device's internals."""

EDGE_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("edge_runtime", "edge_runtime.aio", "edge_runtime.states", "edge_runtime.settings")),
    ("fetch", ("edge_runtime.fetch",)),
    ("build", ("edge_runtime.build",)),
    ("validate", ("edge_runtime.validate",)),
    ("serve", ("edge_runtime.serve",)),
    ("report", ("edge_runtime.report",)),
    ("reconciler", ("edge_runtime.resources", "edge_runtime.lifecycle", "edge_runtime.repository")),
    ("composition root", ("edge_runtime.app", "edge_runtime.cli")),
)
"""The rooms of ``edge_runtime/`` from the bottom up: the life cycle's stages in their order, the reconciler that
drives them, the composition root that wires everything. A module may import from its own room and the rooms below;
a module in no room fails the test (say where it belongs here)."""

MAX_FUNCTION_LINES = 60
"""From ``def`` to the function's last line, docstring included (decorators not)."""
TORCH_FREE = ("edge_runtime", "edgeloop_core")
"""Run on a Jetson without the cloud's stack: not a single import of these, anywhere in them."""
CLOUD_ONLY = ("torch", "modelopt", "kfp", "components", "pipelines")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module


@dataclass(frozen=True)
class Import:
    """``importer`` imports ``name`` (as written, absolute) at ``line``; ``target`` is the project module it
    resolves to (``None`` outside the project)."""

    importer: str
    name: str
    target: str | None
    line: int


def source_files(root: Path) -> Iterator[Path]:
    """Every .py file of the project under ``root``: no hidden folder (.venv, .tools, .git), no build output, no
    generated protobuf module."""
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(
            d for d in subfolders
            if not d.startswith(".") and d != "__pycache__" and not d.endswith(".egg-info")
            and not (here == root and d in SKIPPED_TOP_LEVEL))
        for file in sorted(files):
            if file.endswith(".py") and "_pb2" not in file:
                yield here / file


def load_modules(root: Path) -> dict[str, Module]:
    """Dotted module name → its parsed source (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for path in source_files(root):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            modules[".".join(parts)] = Module(".".join(parts), path, ast.parse(path.read_text(), str(path)))
    return modules


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The absolute package a ``from`` statement names (relative ones resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package.pop()
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _project_module(name: str, modules: dict[str, Module]) -> str | None:
    """The project module ``name`` is, or is inside of (``pkg.mod.Class`` → ``pkg.mod``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(modules: dict[str, Module]) -> Iterator[Import]:
    """Every import statement of every module, wherever it is (top level, function, ``if TYPE_CHECKING``)."""
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, node)
                # ``from pkg import sub`` imports the module pkg.sub; ``from pkg import name`` imports pkg
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for name in names:
                target = _project_module(name, modules)
                yield Import(module.name, name, target if target != module.name else None, node.lineno)


def import_cycles(modules: dict[str, Module]) -> list[list[Import]]:
    """One cycle (as the imports that close it) for every group of modules that import each other, directly or not
    (the strongly connected components of the import graph, Tarjan's algorithm)."""
    edges: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for imp in imports(modules):
        if imp.target is not None:
            edges[imp.importer].setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the module count
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(modules):
        if name not in index:
            visit(name)
    return [_cycle_through(group, edges) for group in groups]


def _cycle_through(group: list[str], edges: dict[str, dict[str, Import]]) -> list[Import]:
    """A shortest path from the group's first module back to itself, inside the group (breadth first)."""
    start, members = group[0], set(group)
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt, imp in sorted(edges[node].items()):
                if nxt == start:
                    path = [imp]
                    while path[0].importer != start:
                        path.insert(0, came_from[path[0].importer])
                    return path
                if nxt in members and nxt not in came_from:
                    came_from[nxt] = imp
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {group}")  # a strongly connected group always has one


def imports_of(modules: dict[str, Module], importers: tuple[str, ...], banned: tuple[str, ...]) -> list[Import]:
    """Imports from modules in ``importers`` (packages, with their submodules) of anything in ``banned``."""
    return [imp for imp in imports(modules)
            if _inside(imp.importer, importers) and _inside(imp.name, banned)]


def _inside(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def edge_room(name: str) -> int | None:
    """The index in :data:`EDGE_LAYERS` of the room module ``name`` lives in: the entry naming it or the package
    it is in (the longest such); ``edge_runtime`` itself names only its ``__init__``, never its submodules."""
    best, length = None, -1
    for rank, (_, prefixes) in enumerate(EDGE_LAYERS):
        for prefix in prefixes:
            matches = name == prefix or ("." in prefix and name.startswith(prefix + "."))
            if matches and len(prefix) > length:
                best, length = rank, len(prefix)
    return best


def upward_imports(modules: dict[str, Module]) -> list[str]:
    """Inside ``edge_runtime``: every import of a room above the importer's, and every module in no room."""
    problems = [f"{name} is in no room: add it to EDGE_LAYERS" for name in modules
                if _inside(name, ("edge_runtime",)) and edge_room(name) is None]
    for imp in imports(modules):
        if imp.target is None or not _inside(imp.importer, ("edge_runtime",)):
            continue
        if not _inside(imp.target, ("edge_runtime",)):
            continue
        low, high = edge_room(imp.importer), edge_room(imp.target)
        if low is not None and high is not None and high > low:
            problems.append(f"{imp.importer} ({EDGE_LAYERS[low][0]}) imports {imp.target} ({EDGE_LAYERS[high][0]}) "
                            f"at line {imp.line}")
    return problems


def long_functions(modules: dict[str, Module], package: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (or method, nested ones included) in ``package`` longer than ``limit`` lines."""
    found = []
    for module in modules.values():
        if not _inside(module.name, (package,)):
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append(f"{module.name}.{node.name} (line {node.lineno}): {lines} lines")
    return found


def _show(imps: list[Import]) -> str:
    return "\n".join(f"  {i.importer} imports {i.name} (line {i.line})" for i in imps)


# --- the project --------------------------------------------------------------------------------------------------
@functools.cache
def project() -> dict[str, Module]:
    return load_modules(ROOT)


def test_the_whole_project_is_read():
    for package in (CORE, "edge_runtime", "components", "pipelines", "telemetry_hub", "edgeloop", "tests"):
        assert package in project(), f"{package}/ was not found under {ROOT}"
    assert "tests.test_architecture" in project()
    assert not any("_pb2" in name for name in project())


def test_no_import_cycle():
    cycles = import_cycles(project())
    assert not cycles, "import cycles (TYPE_CHECKING and function-level imports count):\n" + "\n\n".join(
        _show(cycle) for cycle in cycles)


def test_the_core_imports_nothing_that_imports_it():
    found = imports_of(project(), (CORE,), ABOVE_CORE)
    assert not found, f"{CORE} must stay neutral:\n{_show(found)}"


def test_the_cloud_and_the_hub_import_nothing_from_the_edge():
    found = imports_of(project(), KEPT_FROM_EDGE, ("edge_runtime",))
    assert not found, f"import what is shared from {CORE}, not from edge_runtime:\n{_show(found)}"


def test_rooms_of_the_edge_runtime_import_only_downwards():
    problems = upward_imports(project())
    assert not problems, "arrows must point down (" + " < ".join(n for n, _ in EDGE_LAYERS) + "):\n  " + \
        "\n  ".join(problems)


def test_no_function_in_the_edge_runtime_is_over_60_lines():
    found = long_functions(project(), "edge_runtime")
    assert not found, f"split these along their jobs (at most {MAX_FUNCTION_LINES} lines):\n  " + "\n  ".join(found)


def test_the_edge_and_the_core_never_import_the_cloud_stack():
    found = imports_of(project(), TORCH_FREE, CLOUD_ONLY)
    assert not found, f"the device runs without {', '.join(CLOUD_ONLY)} (lazy imports included):\n{_show(found)}"


def test_the_edge_and_the_core_import_without_torch():
    """Every module of edge_runtime and edgeloop_core imports while torch, modelopt, kfp and the cloud packages cannot
    be imported at all (a third-party import that would pull torch in included)."""
    code = f"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {CLOUD_ONLY!r}:
            raise ImportError(f'{{name}} is blocked: the edge must not need it')
sys.meta_path.insert(0, Block())
names = []
for package in {TORCH_FREE!r}:
    root = importlib.import_module(package)
    names += [m.name for m in pkgutil.walk_packages(root.__path__, package + '.')]
for name in names:
    importlib.import_module(name)
assert 'torch' not in sys.modules
print(' '.join(names))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    assert {"edge_runtime.lifecycle", "edge_runtime.serve.server", "edgeloop_core.contract"} <= imported, imported


# --- each check catches what it forbids ---------------------------------------------------------------------------
CLEAN_TREE = {
    "edgeloop_core/__init__.py": "",
    "edgeloop_core/store.py": "def put():\n    from edgeloop_core import files\n",
    "edgeloop_core/files.py": "",
    "edge_runtime/__init__.py": "",
    "edge_runtime/fetch/__init__.py": "",
    "edge_runtime/fetch/cache.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from edgeloop_core.store import put\n",
    "edge_runtime/lifecycle.py": "from .fetch import cache\n\n\ndef build():\n    import numpy\n" + "    x = 1\n" * 58,
    "components/__init__.py": "",
    "components/publish.py": "import edgeloop_core.store\n",
}
"""A small project that keeps every rule (its longest function is 60 lines)."""
BAD_TREE = {
    **CLEAN_TREE,
    "edgeloop_core/store.py": "def put():\n    from edge_runtime.fetch import cache\n",
    "edge_runtime/fetch/cache.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from edge_runtime.lifecycle import ModelRuntime\n",
    "edge_runtime/lifecycle.py": "from .fetch import cache\n\n\ndef build():\n    import torch\n" + "    x = 1\n" * 59,
    "edge_runtime/gadgets.py": "",
    "components/publish.py": "import edge_runtime.fetch.cache\n",
    "edge_runtime/serve/triton/inference_pb2.py": "import edge_runtime.lifecycle\n",
    ".venv/lib/torch.py": "import edge_runtime.lifecycle\n",
}
"""The same project breaking every rule once: a cycle through a TYPE_CHECKING import and a relative one
(fetch.cache ↔ lifecycle), the core importing the edge inside a function, a component importing the edge, an
upward import, a module in no room, a 61-line function with a lazy torch import; plus a generated module and a
virtualenv that would break them too if they were read."""


def _write(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return load_modules(root)


def test_the_checks_catch_what_they_forbid(tmp_path):
    modules = _write(tmp_path, BAD_TREE)
    assert "edge_runtime.serve.triton.inference_pb2" not in modules and not any("venv" in m for m in modules)
    cycles = import_cycles(modules)
    core = imports_of(modules, (CORE,), ABOVE_CORE)
    cloud = imports_of(modules, KEPT_FROM_EDGE, ("edge_runtime",))
    upward = upward_imports(modules)
    long = long_functions(modules, "edge_runtime")
    torch = imports_of(modules, TORCH_FREE, CLOUD_ONLY)

    assert [[(i.importer, i.target) for i in cycle] for cycle in cycles] == [[
        ("edge_runtime.fetch.cache", "edge_runtime.lifecycle"), ("edge_runtime.lifecycle", "edge_runtime.fetch.cache")]]
    assert [(i.importer, i.name, i.line) for i in core] == [("edgeloop_core.store", "edge_runtime.fetch.cache", 2)]
    assert [(i.importer, i.name) for i in cloud] == [("components.publish", "edge_runtime.fetch.cache")]
    assert sorted(upward) == ["edge_runtime.fetch.cache (fetch) imports edge_runtime.lifecycle (reconciler) at line 3",
                              "edge_runtime.gadgets is in no room: add it to EDGE_LAYERS"]
    assert long == ["edge_runtime.lifecycle.build (line 4): 61 lines"]
    assert [(i.importer, i.name) for i in torch] == [("edge_runtime.lifecycle", "torch")]


def test_a_tree_that_keeps_the_rules_passes_every_check(tmp_path):
    """The same checks find nothing in the clean tree (so what they found above are the faults, and 60 lines pass)."""
    modules = _write(tmp_path, CLEAN_TREE)
    assert len(modules) == len(CLEAN_TREE)
    assert not import_cycles(modules)
    assert not imports_of(modules, (CORE,), ABOVE_CORE)
    assert not imports_of(modules, KEPT_FROM_EDGE, ("edge_runtime",))
    assert not upward_imports(modules)
    assert not long_functions(modules, "edge_runtime")
    assert not imports_of(modules, TORCH_FREE, CLOUD_ONLY)
