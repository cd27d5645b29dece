"""The skip gate (tests/conftest.py): with ``CI=true`` a skip the allow-list does not name fails the run and is
named; an allowed one does not; without CI nothing changes. Each run is a real pytest session (pytester)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SKIPPING_TESTS = '''
import pytest

def test_runs():
    assert True

@pytest.mark.gpu
def test_on_a_gpu():
    pytest.skip("no CUDA GPU here")

def test_with_postgres():
    pytest.skip("no PostgreSQL reachable")

@pytest.mark.xfail(reason="a known bug, not a skip")
def test_known_bug():
    raise AssertionError
'''


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project with the gate's hooks in its conftest and an allow-list naming the ``gpu`` marker and one node id."""
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    pytester.makeconftest("from tests.conftest import pytest_configure  # noqa: F401\n")
    allowed = pytester.path / "tests" / "allowed_skips.txt"
    allowed.parent.mkdir()
    allowed.write_text("# why each is allowed\nmark:gpu  # no GPU in CI\n"
                       "test_allowed.py::test_*  # a node-id pattern\n")
    pytester.makepyfile(test_skipping=SKIPPING_TESTS,
                        test_allowed="import pytest\n\ndef test_optional():\n    pytest.skip('allowed by name')\n")
    return pytester


def test_in_ci_a_skip_not_on_the_list_fails_the_run_and_is_named(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["CI=true: 1 skipped test(s) not allowed by tests/allowed_skips.txt*",
                                 "  test_skipping.py::test_with_postgres: no PostgreSQL reachable"])
    assert "test_on_a_gpu:" not in result.stdout.str() and "test_optional:" not in result.stdout.str()


def test_in_ci_allowed_skips_pass(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = project.runpytest("-p", "no:cacheprovider", "-k", "not postgres")
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "not allowed by" not in result.stdout.str()


def test_a_module_skipped_whole_counts_too(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    project.makepyfile(test_whole="import pytest\n\npytest.skip('no espeak-ng', allow_module_level=True)\n")
    result = project.runpytest("-p", "no:cacheprovider", "test_whole.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["  test_whole.py: no espeak-ng"])


def test_without_ci_nothing_changes(project, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "not allowed by" not in result.stdout.str()


def test_an_allowed_pattern_must_say_why(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    (project.path / "tests" / "allowed_skips.txt").write_text("test_skipping.py::*\n")
    result = project.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*allowed_skips.txt:1: 'test_skipping.py::[*]' needs a '# why' comment*"])


def test_the_project_allow_list_names_only_the_gpu_tests() -> None:
    from pathlib import Path

    from tests.conftest import read_allowed_skips, skip_allowed

    patterns = read_allowed_skips(Path(__file__).with_name("allowed_skips.txt"))
    assert skip_allowed("tests/edge_runtime/test_engines_and_batching.py::test_engine_conformance[tensorrt]", set(),
                        patterns)
    assert skip_allowed("tests/edge_runtime/test_tensorrt_path.py::test_x", {"gpu"}, patterns)
    for node in ("tests/telemetry_hub/test_hub.py::test_ingest_deduplicates_and_builds_the_fleet_view[postgresql]",
                 "tests/edge_runtime/test_triton.py::test_a_bad_request_merged_with_good_ones_fails_alone[python]",
                 "tests/audio/test_keyword_spotting.py::test_x",
                 "tests/edge_runtime/test_engines_and_batching.py::test_engine_conformance[onnxruntime-cpu]"):
        assert not skip_allowed(node, {"integration"}, patterns), node
