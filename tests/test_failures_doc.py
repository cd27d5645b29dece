"""Every row of the failure-behaviour table (docs/failures.md) names the tests that prove it, and those tests exist.

A row without a test is a promise nobody checks; a row naming a test that was renamed or deleted is worse, it
looks checked. Test ids are read from the test files' syntax trees (no import, no collection: this runs in
milliseconds)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "failures.md"
TEST_ID = re.compile(r"`(tests/[\w/]+\.py::[\w:]+)`")
RULE = re.compile(r"\|[-:| ]+\|")


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the first Markdown table in ``text`` (header and rule left out)."""
    rows, in_table = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            if in_table and not RULE.fullmatch(line.strip()):
                rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
            in_table = True
        elif in_table:
            break
    return rows


def defined_tests(path: Path) -> set[str]:
    """``tests/x.py::test_name`` and ``tests/x.py::TestClass::test_name`` for every test defined in ``path``."""
    module = ast.parse(path.read_text(), filename=str(path))
    relative = path.relative_to(ROOT).as_posix()
    found = set()
    for node in module.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            found.add(f"{relative}::{node.name}")
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            found.update(f"{relative}::{node.name}::{item.name}" for item in node.body
                         if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test"))
    return found


def test_table_rows_are_read_as_the_page_shows_them() -> None:
    rows = table_rows("intro\n\n| a | b |\n|---|---|\n| x | `tests/t.py::test_y` |\n| z | — |\n\nafter\n| no | |\n")
    assert rows == [["x", "`tests/t.py::test_y`"], ["z", "—"]]


def test_every_failure_row_names_tests_that_exist() -> None:
    header_line = next(line for line in PAGE.read_text().splitlines() if line.startswith("|"))
    assert header_line.rstrip().endswith("| proved by |"), "the table's last column names the tests"
    rows = table_rows(PAGE.read_text())
    assert len(rows) >= 10, "the failure table went missing"
    known: dict[Path, set[str]] = {}
    problems = []
    for cells in rows:
        fault = cells[0][:70]
        named = TEST_ID.findall(cells[-1])
        if not named:
            problems.append(f"row {fault!r} names no test")
        for test_id in named:
            path = ROOT / test_id.split("::")[0]
            if not path.is_file():
                problems.append(f"row {fault!r} names {test_id}, but {path.relative_to(ROOT)} does not exist")
                continue
            if test_id not in known.setdefault(path, defined_tests(path)):
                problems.append(f"row {fault!r} names {test_id}, which is not a test in that file")
    assert not problems, "\n".join(problems)
