"""Shared fixtures: a real SeaweedFS S3 server on loopback for the session, fresh buckets, signing keys; and the
skip gate: in CI (``CI=true``) a skipped test fails the run unless ``tests/allowed_skips.txt`` allows it."""

from __future__ import annotations

import fnmatch
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeloop.local_s3 import LocalS3
from edgeloop_core.contract import generate_signing_key, load_signing_key, load_verify_key
from edgeloop_core.store import ObjectStore

# --- the skip gate ----------------------------------------------------------------------------------------------
# A test that skips for want of PostgreSQL, espeak-ng or Triton lets CI go green having checked less. In CI every
# skip is a failure unless a line of tests/allowed_skips.txt (under the run's root folder) allows it: a node-id
# pattern (fnmatch) or ``mark:<name>``, each with a ``#`` comment saying why. Without CI nothing changes: a
# developer's machine may lack a GPU, PostgreSQL or espeak-ng.
ALLOWED_SKIPS = Path("tests") / "allowed_skips.txt"


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``, as GitHub Actions, GitLab and most runners set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def read_allowed_skips(path: Path) -> list[str]:
    """The patterns in an allow-list file; a pattern without a ``# why`` comment is refused (a usage error)."""
    if not path.is_file():
        return []
    patterns = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        pattern, _, why = line.partition("#")
        if not pattern.strip():
            continue
        if not why.strip():
            raise pytest.UsageError(f"{path}:{number}: {pattern.strip()!r} needs a '# why' comment")
        patterns.append(pattern.strip())
    return patterns


def skip_allowed(node_id: str, markers: set[str], patterns: list[str]) -> bool:
    """Whether one of ``patterns`` (node-id fnmatch patterns, or ``mark:<name>``) allows this skip."""
    return any(pattern.removeprefix("mark:") in markers if pattern.startswith("mark:")
               else fnmatch.fnmatchcase(node_id, pattern) for pattern in patterns)


class SkipGate:
    """The pytest plugin behind the gate (one per run, registered by :func:`pytest_configure`)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.skips: list[tuple[str, str]] = []
        """Each skip the allow-list does not name: (node id, reason)."""
        self.patterns = read_allowed_skips(config.rootpath / ALLOWED_SKIPS)

    def note(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):  # an expected failure is reported as skipped too
            return
        markers = {name for name, on in report.keywords.items() if on} if isinstance(report, pytest.TestReport) \
            else set()
        if not skip_allowed(report.nodeid, markers, self.patterns):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Skips at setup (a fixture's ``pytest.skip``) and in the test itself."""
        self.note(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """Skips of whole modules (``pytest.skip(allow_module_level=True)``, ``importorskip``)."""
        self.note(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Fail a run that skipped a test the allow-list does not name, and say which."""
        if not self.skips:
            return
        lines = [f"CI=true: {len(self.skips)} skipped test(s) not allowed by {ALLOWED_SKIPS} (install what they "
                 "need, or add a pattern with a '# why' comment):", *(f"  {n}: {r}" for n, r in self.skips)]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        for line in lines:
            if reporter is not None:
                reporter.write_line(line, red=True)
            else:
                print(line, file=sys.stderr)
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """In CI, turn the skip gate on."""
    if in_ci():
        config.pluginmanager.register(SkipGate(config), "edgeloop-skip-gate")


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """One SeaweedFS (``weed mini``) for the whole session, on free loopback ports."""
    server = LocalS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(local_s3: LocalS3) -> ObjectStore:
    """A fresh, empty bucket on the session's S3 server."""
    return local_s3.store(f"test-{secrets.token_hex(4)}")


@pytest.fixture
def s3_env(local_s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> LocalS3:
    """boto3's environment pointed at the session's S3 server (components and kfp.local inherit it)."""
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    return local_s3


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``signing-key.pem`` and ``verify-key.pem``."""
    directory = tmp_path_factory.mktemp("keys")
    generate_signing_key(directory)
    return directory


@pytest.fixture(scope="session")
def signing_key(key_dir: Path):
    return load_signing_key(key_dir / "signing-key.pem")


@pytest.fixture(scope="session")
def verify_key(key_dir: Path):
    return load_verify_key(key_dir / "verify-key.pem")


def make_staged_version(directory: Path, name: str = "demo-model", version: str = "v1"):
    """Small real files (not a model) and an unsigned manifest describing them; no torch needed."""
    from datetime import datetime, timezone

    import numpy as np

    from edgeloop_core.contract import FileRef, Manifest, TensorSpec, Validation, Variant, sha256_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fp32.onnx").write_bytes(b"not really onnx, but bytes with a digest" * 100)
    (directory / "int8-ort.onnx").write_bytes(secrets.token_bytes(2048))
    with open(directory / "validation.npz", "wb") as fh:
        np.savez(fh, inputs=np.zeros((4, 1, 8, 8), np.float32), labels=np.arange(4))
    (directory / "report.html").write_text("<html>report</html>")

    def ref(file: str) -> dict:
        digest, size = sha256_file(directory / file)
        return {"file": file, "sha256": digest, "size_bytes": size}

    return Manifest(
        name=name,
        version=version,
        created_at=datetime(2026, 11, 24, tzinfo=timezone.utc),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        labels=[str(i) for i in range(10)],
        variants=[
            Variant(**ref("fp32.onnx"), name="fp32", precision="fp32", backends=["tensorrt", "onnxruntime"],
                    accuracy=0.99),
            Variant(**ref("int8-ort.onnx"), name="int8-ort", precision="int8", quantization="ort-qdq",
                    backends=["onnxruntime"], accuracy=0.985),
        ],
        validation=Validation(**ref("validation.npz"), num_samples=4, reference={"fp32": 0.99, "int8-ort": 0.985},
                              tolerance=0.01),
        report=FileRef(**ref("report.html")),
    )


@pytest.fixture
def edge_settings(tmp_path, local_s3, key_dir, monkeypatch):
    """Settings for a runtime against the session's S3 (bucket created by the test), ports picked freely."""
    from edge_runtime.settings import EdgeSettings

    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)

    def make(bucket: str, **overrides):
        values = dict(s3_endpoint_url=local_s3.endpoint_url, s3_bucket=bucket, cache_dir=tmp_path / "cache",
                      verify_key_file=key_dir / "verify-key.pem", grpc_port=0, metrics_port=0,
                      poll_interval_s=3600, retry_initial_s=0.2, retry_max_s=1.0, fetch_attempts=2,
                      telemetry_interval_s=3600, device_id="test-jetson",
                      # tests not about the variant choice take the static preference order: what they check must
                      # not depend on which variant this machine happens to run faster (test_variant_choice measures)
                      variant_choice_budget_s=0)
        values.update(overrides)
        return EdgeSettings(**values)

    return make
