"""Capture policies in the signed channel pointer: a fleet's capture switched from the cloud without a Helm upgrade.
The pointer's policy is signed with the rest (a pointer without one reads byte for byte as before the field
existed), set by ``edgeloop pipeline set-capture``, and used by a device only from a pointer it accepted, below a
policy its own desired file sets. End to end against the real runtime and SeaweedFS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_runtime.fetch.cache import ArtifactCache
from edge_runtime.fetch.desired import DesiredModels
from edgeloop_core.contract import (
    ArtifactLayout,
    generate_signing_key,
    load_signing_key,
    parse_pointer,
    sign_pointer,
    verify_pointer,
)
from edgeloop_core.contract.captures import CapturePolicy
from edgeloop_core.contract.signing import make_signature
from edgeloop_core.errors import SignatureInvalid
from pipelines.cli import app as pipeline_app
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until
from tests.edge_runtime.test_capture import MODEL, captured, infer

pytestmark = pytest.mark.integration
CHANNEL_KEY = ArtifactLayout().channel_key(MODEL, "stable")


def signed_bytes(payload: dict, key) -> bytes:
    """``payload`` signed over its sorted compact JSON, as any signer of a pointer would (by hand: no model)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({**payload, "signature": make_signature(key, canonical).model_dump(mode="json")}).encode()


def old_pointer(sequence: int, key) -> dict:
    now = datetime.now(timezone.utc)
    return {"name": MODEL, "channel": "stable", "version": "v1", "sequence": sequence,
            "expires": (now + timedelta(days=1)).isoformat().replace("+00:00", "Z"),
            "updated_at": now.isoformat().replace("+00:00", "Z")}


def test_a_pointer_signed_before_capture_existed_verifies_and_a_changed_policy_does_not(signing_key, verify_key):
    old = parse_pointer(signed_bytes(old_pointer(7, signing_key), signing_key), MODEL, "stable")
    assert old.capture is None and b"capture" not in old.canonical_bytes()
    verify_pointer(old, verify_key)
    assert b"capture" not in old.to_json()  # devices older than the field would refuse the key

    pointer = sign_pointer(MODEL, "stable", "v1", 8, signing_key,
                           capture=CapturePolicy(sample_rate=0.05, drift_burst={"threshold": 0.3}))
    stored = json.loads(pointer.to_json())
    verify_pointer(parse_pointer(json.dumps(stored).encode(), MODEL, "stable"), verify_key)
    stored["capture"]["sample_rate"] = 1.0  # someone with bucket write access widens capture
    with pytest.raises(SignatureInvalid) as raised:
        verify_pointer(parse_pointer(json.dumps(stored).encode(), MODEL, "stable"), verify_key)
    assert "signature" in str(raised.value)


def test_the_desired_file_policy_wins_over_the_pointers(edge_settings, tmp_path):
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 0.3}}]}))
    settings = edge_settings("unused", desired_file=desired, cache_dir=tmp_path / "cache")
    cache, models = ArtifactCache(settings.cache_dir, 1 << 30), DesiredModels(settings)
    cache.record_pointer_capture(MODEL, CapturePolicy(sample_rate=1.0))
    assert models.capture_configuration()[1][MODEL].sample_rate == 0.3
    desired.write_text(json.dumps({"models": [{"name": MODEL}]}))  # the file sets none: the pointer's applies
    assert models.capture_configuration()[1][MODEL].sample_rate == 1.0
    cache.record_pointer_capture(MODEL, None)  # the next accepted pointer carries none
    assert MODEL not in models.capture_configuration()[1]


def cli(store, key_dir, *args: str):
    env = {"EDGELOOP_S3_BUCKET": store.bucket, "EDGELOOP_SIGNING_KEY_FILE": str(key_dir / "signing-key.pem")}
    return CliRunner().invoke(pipeline_app, list(args), env=env, catch_exceptions=True)


def test_a_resigned_pointer_switches_capture_without_a_restart_and_a_bad_one_changes_nothing(
        store, signing_key, key_dir, trained, edge_settings, local_s3, tmp_path):
    publish_model(store, signing_key, trained, "v1")
    desired = tmp_path / "desired.json"  # follows stable; no policy of its own; shards roll at once
    desired.write_text(json.dumps({"models": [{"name": MODEL}], "capture": {"shard_max_age_s": 0.2}}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, poll_interval_s=0.3, retry_initial_s=0.1,
                                     retry_max_s=0.3))
    x = trained.x_val[:2].astype(np.float32)
    try:
        edge.wait_ready()
        infer(edge, x, "before")
        assert edge.app.capture.policies == {}

        policy = tmp_path / "policy.yaml"
        policy.write_text("sample_rate: 1.0\nitems_per_hour: 100\n")
        result = cli(store, key_dir, "set-capture", MODEL, "stable", "--policy", str(policy))
        assert result.exit_code == 0, result.output
        assert "capture policy" in result.output and "sample_rate" in result.output
        wait_until(lambda: MODEL in edge.app.capture.policies, timeout=10)  # within the poll interval
        assert edge.app.capture.policies[MODEL].items_per_hour == 100
        for i in range(3):
            infer(edge, x, f"after-{i}")
        wait_until(lambda: len(captured(store)) == 3, timeout=20)
        assert set(captured(store)["request_id"]) == {"after-0", "after-1", "after-2"}  # not "before"

        seen = json.loads(store.get_bytes(CHANNEL_KEY))["sequence"]
        stranger = load_signing_key(generate_signing_key(tmp_path / "stranger")[0])
        forged = sign_pointer(MODEL, "stable", "v1", seen + 1, stranger, capture=CapturePolicy(sample_rate=0.01))
        nonsense = signed_bytes({**old_pointer(seen + 2, signing_key), "capture": {"enabled": True}}, signing_key)
        for data, reason in ((forged.to_json(), "not trusted"), (nonsense, "invalid at capture.enabled")):
            store.put_bytes(CHANNEL_KEY, data)
            edge.app.runtime.wake()
            wait_until(lambda r=reason: any(r in f["error"] for f in edge.events("failed")), timeout=10)
            assert edge.app.capture.policies[MODEL].sample_rate == 1.0  # a refused pointer changes nothing
            assert edge.app.runtime.serving.version == "v1" and edge.app.runtime.ready()
        said = next(f["error"] for f in edge.events("failed") if "capture.enabled" in f["error"])
        assert "\n" not in said and "Traceback" not in said, said

        result = cli(store, key_dir, "promote", MODEL, "v1", "--no-capture")  # signed again, without a policy
        assert result.exit_code == 0, result.output
        wait_until(lambda: MODEL not in edge.app.capture.policies, timeout=10)
    finally:
        edge.stop()


def test_set_capture_refuses_a_policy_with_nonsense_in_one_line(store, key_dir, tmp_path, local_s3):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"enabled": True}))
    env = {**os.environ, **local_s3.env(), "EDGELOOP_S3_BUCKET": store.bucket,
           "EDGELOOP_SIGNING_KEY_FILE": str(key_dir / "signing-key.pem")}
    run = subprocess.run([sys.executable, "-m", "edgeloop.cli", "pipeline", "set-capture", MODEL, "--policy",
                          str(policy)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr, run.stderr
    assert "capture policy" in run.stderr and "enabled" in run.stderr and "Extra inputs" in run.stderr


def test_moving_a_channel_keeps_the_policy_this_key_signed_and_never_launders_a_planted_one(
        store, signing_key, trained, tmp_path):
    from components.publish import move_channel, set_channel_capture

    layout = ArtifactLayout()
    publish_model(store, signing_key, trained, "v1")
    publish_model(store, signing_key, trained, "v2", channel=None)
    set_channel_capture(store, layout, MODEL, "stable", signing_key, CapturePolicy(sample_rate=0.5))
    moved = move_channel(store, layout, MODEL, "stable", "v2", signing_key)  # a promote keeps the policy
    assert moved.version == "v2" and moved.capture == CapturePolicy(sample_rate=0.5)

    stranger = load_signing_key(generate_signing_key(tmp_path / "stranger")[0])
    planted = sign_pointer(MODEL, "stable", "v2", moved.sequence + 1, stranger, capture=CapturePolicy(sample_rate=1))
    store.put_bytes(CHANNEL_KEY, planted.to_json())
    assert move_channel(store, layout, MODEL, "stable", "v1", signing_key).capture is None
    store.put_bytes(CHANNEL_KEY, planted.to_json())
    with pytest.raises(SignatureInvalid) as raised:
        set_channel_capture(store, layout, MODEL, "stable", signing_key, CapturePolicy(sample_rate=0.1))
    assert "not a pointer this signing key signed" in str(raised.value)
