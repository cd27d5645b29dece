"""Fixtures of the pipeline tests: real ultralytics YOLO exports (:mod:`tests.pipelines.yolo`), made once a session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pipelines.yolo import ULTRA_PY, Exporter


@pytest.fixture(scope="session")
def yolo_exporter(tmp_path_factory) -> Iterator[Exporter]:
    """Exports on demand, each spec once a session. Skips only when ``.tools/ultralytics`` is not there (``make
    test`` installs it, and in CI the skip gate fails the run); a failing export fails the test that asked."""
    if not ULTRA_PY.exists():
        pytest.skip(f"no {ULTRA_PY}: ultralytics is not installed (make test installs it)")
    exporter = Exporter(ULTRA_PY, tmp_path_factory.mktemp("yolo-exports"))
    yield exporter
    exporter.close()
    if exporter.seconds:
        timings = ", ".join(f"{spec.slug} {seconds:.1f}s" for spec, seconds in exporter.seconds.items())
        builds = ", ".join(f"{family} {seconds:.1f}s" for family, seconds in exporter.build_seconds.items())
        print(f"\nultralytics exports: {timings}; model builds: {builds}")
