"""A version published by an older edgeloop (tests/data/published-before-layout: a manifest, its files and a
signed channel pointer, written by the code of commit 2fa95b6, before the core package and the staged layout) is
still accepted: fetched, verified, validated and served by today's runtime through its channel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from edgeloop_core.contract import (
    ArtifactLayout,
    Manifest,
    load_verify_key,
    parse_pointer,
    verify_manifest,
    verify_pointer,
)
from tests.edge_runtime.conftest import RunningEdge

pytestmark = pytest.mark.integration
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "published-before-layout"
BUCKET = FIXTURE / "bucket"


def test_old_manifest_and_pointer_parse_and_verify():
    key = load_verify_key(FIXTURE / "verify-key.pem")
    layout = ArtifactLayout()
    manifest = Manifest.from_json((BUCKET / layout.manifest_key("digits-cnn", "v1")).read_text())
    verify_manifest(manifest, key)
    pointer = parse_pointer((BUCKET / "models/digits-cnn/channels/stable.json").read_bytes(), "digits-cnn", "stable")
    assert verify_pointer(pointer, key).version == "v1"


def test_old_version_is_served_through_its_channel(store, edge_settings):
    for path in sorted(p for p in BUCKET.rglob("*") if p.is_file()):
        store.put_file(path.relative_to(BUCKET).as_posix(), path)
    edge = RunningEdge(edge_settings(store.bucket, verify_key_file=FIXTURE / "verify-key.pem"))
    try:
        edge.wait_ready()
        validation = np.load(BUCKET / "models/digits-cnn/v1/validation.npz")
        client = triton.InferenceServerClient(edge.address)
        tensor = triton.InferInput("input", [16, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(validation["inputs"][:16].astype(np.float32))
        result = client.infer("digits-cnn", [tensor])
        assert result.get_response().model_version == "v1"
        assert (result.as_numpy("logits").argmax(1) == validation["labels"][:16]).mean() >= 0.8
        assert edge.events("validated")[-1]["passed"]
    finally:
        edge.stop()
