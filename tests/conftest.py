"""Shared fixtures: a real SeaweedFS S3 server on loopback for the session, fresh buckets, signing keys."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeloop.local_s3 import LocalS3
from edgeloop_core.contract import generate_signing_key, load_signing_key, load_verify_key
from edgeloop_core.store import ObjectStore


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
def signing_key(key_dir: Path):  # noqa: ANN201
    return load_signing_key(key_dir / "signing-key.pem")


@pytest.fixture(scope="session")
def verify_key(key_dir: Path):  # noqa: ANN201
    return load_verify_key(key_dir / "verify-key.pem")


def make_staged_version(directory: Path, name: str = "demo-model", version: str = "v1"):  # noqa: ANN201
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
