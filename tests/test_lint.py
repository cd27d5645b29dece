"""Lint that means it: the neutral core type-checks under ``mypy --strict`` (settings: ``[tool.mypy]`` in
pyproject.toml: strict, and a ``# type: ignore`` must name its error code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_package_passes_mypy_strict():
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "edgeloop_core"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, f"mypy --strict edgeloop_core failed:\n{done.stdout}{done.stderr}"



def test_ruff_passes_with_the_strict_rules_and_no_blanket_ignores():
    """``ruff check .`` with the rules in pyproject.toml (PGH004 refuses a ``noqa`` that names no rule); and no file
    opts out wholesale (``# ruff: noqa``, ``# flake8: noqa``) or silences mypy without a code."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, f"ruff check . failed:\n{done.stdout}{done.stderr}"
    import re

    blanket = re.compile(r"#\s*(ruff|flake8)\s*:\s*noqa|#\s*type:\s*ignore(?!\[)")
    offenders = [f"{path.relative_to(ROOT)}:{number}"
                 for folder in ("edgeloop_core", "edge_runtime", "components", "pipelines", "telemetry_hub", "edgeloop",
                                "bench", "scripts", "tests")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 if "_pb2" not in path.name and path != Path(__file__).resolve()
                 for number, line in enumerate(path.read_text().splitlines(), 1) if blanket.search(line)]
    assert not offenders, f"blanket ignores: {offenders}"
