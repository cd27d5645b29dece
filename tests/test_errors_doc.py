"""The error tree is drawn from the classes themselves: the generated page ``docs/errors.md`` and the diagram in
``edgeloop_core/errors.py``'s docstring both match ``EdgeloopError.__subclasses__()``, the status table and the CLI."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from edgeloop_core import errors

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate_error_reference.py"
HOW_TO_FIX = "run `python scripts/generate_error_reference.py` and commit docs/errors.md"


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_error_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_is_current(reference):
    fresh = reference.render()
    committed = (ROOT / "docs" / "errors.md").read_text()
    assert committed == fresh, f"docs/errors.md is stale: {HOW_TO_FIX}"


def test_the_walk_finds_every_class_of_the_module_once(reference):
    walked = [cls for _, cls in reference.tree()]
    defined = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, errors.EdgeloopError) and cls.__module__ == errors.__name__]
    assert len(walked) == len(set(walked))
    assert set(walked) == set(defined)


def test_the_docstring_diagram_is_the_class_tree(reference):
    drawn = errors.__doc__.split("::\n\n", 1)[1]
    expected = reference.docstring_diagram()
    assert drawn == expected, f"the diagram in edgeloop_core/errors.py is stale; it should read:\n{expected}"


def test_the_page_shows_what_each_error_does(reference):
    page = reference.render()
    for depth, cls in reference.tree():
        line = f"{'    ' * depth}- **`{cls.__name__}`** — "
        assert line in page, f"{cls.__name__} is not drawn at depth {depth}"
    # the statuses and the CLI column come from the real lookup and the real edgeloop.cli.main
    assert "| `DigestMismatch` | `FAILED_PRECONDITION` (as `ContractError`) | exit 1, one line on stderr |" in page
    assert "| `EngineError` | `INTERNAL` (message hidden) | exit 1, one line on stderr |" in page
    assert "| anything else (a bug, a third-party error) | `INTERNAL` (message hidden) | exit 1, Python's traceback |" \
        in page


def test_the_script_writes_the_page(tmp_path):
    out = tmp_path / "errors.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == (ROOT / "docs" / "errors.md").read_text()
