"""Capture bursts on drift: the real runtime serves the digits model whose manifest carries the training data's field
baseline, with a capture policy that samples nothing (``sample_rate: 0``) but bursts on drift. Fed the training
distribution, it captures nothing; fed the same digits as a camera that lost half its light, its own field statistics
(the counts it hands to its stats event) drift past the threshold, a burst starts (logged once, figures only), and
the requests that follow arrive in the real SeaweedFS as Parquet rows with policy ``drift_burst``."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from pydantic import ValidationError

from edgeloop_core.contract import Task
from edgeloop_core.contract.captures import CapturePolicy
from edgeloop_core.drift import build_baseline
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until
from tests.edge_runtime.test_capture import MODEL, captured, metric

pytestmark = pytest.mark.integration
BURST = {"threshold": 0.2, "sample_rate": 1.0, "minutes": 10}


def serve(address: str, images: np.ndarray, batch: int = 8) -> None:
    client = triton.InferenceServerClient(address)
    try:
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch].astype(np.float32)
            tensor = triton.InferInput("input", list(chunk.shape), "FP32")
            tensor.set_data_from_numpy(chunk)
            client.infer(MODEL, [tensor], request_id=f"r{start}")
    finally:
        client.close()


def stats_with_field(edge: RunningEdge) -> list[dict]:
    return [m for s in edge.events("stats") for m in s["models"] if m["model_name"] == MODEL and "field" in m]


def test_drift_past_the_threshold_starts_a_capture_burst_and_the_training_distribution_captures_nothing(
        store, signing_key, trained, edge_settings, tmp_path, caplog):
    from components.data import load_digits_dataset

    train = load_digits_dataset().x_train.astype(np.float32)
    session = ort.InferenceSession(str(trained.good["fp32"]), providers=["CPUExecutionProvider"])
    baseline = build_baseline({"input": train}, {"logits": session.run(None, {"input": train})[0]},
                              Task(kind="classification", num_classes=10))
    publish_model(store, signing_key, trained, "v1", field_baseline=baseline)
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 0, "drift_burst": BURST}}],
                                   "capture": {"shard_max_age_s": 0.2}}))
    held_out = trained.x_val[:240]
    dark = np.clip(held_out * 0.5 + np.random.default_rng(1).normal(0, 0.15, held_out.shape), 0, 1)
    caplog.set_level(logging.INFO)
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, telemetry_interval_s=0.2,
                                     field_stats_rate=1.0, field_stats_min_samples=200))
    try:
        edge.wait_ready()
        serve(edge.address, held_out)  # the training distribution: its counts are taken and checked, no burst
        wait_until(lambda: len(stats_with_field(edge)) >= 1, timeout=20)
        wait_until(lambda: edge.app.capture.drift_checks >= 1, timeout=10)
        serve(edge.address, held_out[:40])
        edge.app.capture.drain()
        assert metric(edge, "edgeloop_capture_bursts_total", model=MODEL) == 0
        assert metric(edge, "edgeloop_capture_items_total", model=MODEL, policy="drift_burst") == 0
        assert edge.app.capture.bursts() == {}

        serve(edge.address, dark)  # the camera lost its light: the next counts drift
        wait_until(lambda: metric(edge, "edgeloop_capture_bursts_total", model=MODEL) == 1, timeout=20)
        assert metric(edge, "edgeloop_capture_burst_active", model=MODEL) == 1
        burst = edge.app.capture.bursts()[MODEL]
        assert burst["divergence"] > BURST["threshold"] and burst["sample_rate"] == 1.0
        serve(edge.address, dark[:32])  # during the burst every request (4 of 8 digits) is captured
        edge.app.capture.drain()
        assert metric(edge, "edgeloop_capture_items_total", model=MODEL, policy="drift_burst") >= 4
        wait_until(lambda: len(captured(store)) >= 4, timeout=20)
        rows = captured(store)
        assert set(rows["policy"]) == {"drift_burst"} and set(rows["model"]) == {MODEL}
        wait_until(lambda: MODEL in edge.events("stats")[-1]["capture"].get("bursts", {}), timeout=10)
        figures = edge.events("stats")[-1]["capture"]
        assert figures["bursts"][MODEL]["feature"] == burst["feature"]
    finally:
        edge.stop()
    said = [r.getMessage() for r in caplog.records if "bursts for" in r.getMessage()]
    assert len(said) == 1, said  # once per burst, though later counts drift too
    assert "field drift" in said[0] and "[" not in said[0]  # figures and a feature name, never tensors


def test_a_drift_burst_policy_refuses_nonsense():
    with pytest.raises(ValidationError) as raised:
        CapturePolicy.model_validate({"drift_burst": {"threshold": 1.5}})
    assert "threshold" in str(raised.value)
    with pytest.raises(ValidationError) as raised:
        CapturePolicy.model_validate({"drift_burst": {"threshold": 0.2, "enabled": True}})
    assert "enabled" in str(raised.value)


def test_the_runtime_starts_without_importing_scipy():
    code = "import sys, edge_runtime.app, edge_runtime.report.capture.worker; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stderr
