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

