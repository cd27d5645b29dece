"""Feedback accuracy on the device: an app sends the right class for requests it made earlier (the Label RPC, by OIP
request id); the runtime compares each with the top-1 it served for that id (remembered off the request path, a
bounded map per model), counts labels / known / correct per model and version, and reports them in the stats
event's field statistics and in Prometheus. No label or class ever reaches the logs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from edge_runtime.report.capture.client import send_label
from edge_runtime.report.field import FieldStatistics, label_classes
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until
from tests.edge_runtime.test_capture import MODEL, infer

pytestmark = pytest.mark.integration


def test_labels_sent_through_the_label_rpc_are_counted_against_what_was_served(store, signing_key, trained,
                                                                               edge_settings, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    publish_model(store, signing_key, trained, "v1")
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 0.0}}],
                                   "capture": {"shard_max_age_s": 3600}}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, repository_control=True,
                                     control_token="s3cret", field_stats_rate=0.0001, telemetry_interval_s=0.3))
    edge.wait_ready()
    try:
        x, y = trained.x_val[:12].astype(np.float32), trained.y_val[:12]
        served = [int(infer(edge, x[i:i + 1], f"fb-{i}").argmax()) for i in range(12)]
        wrong_label = (served[0] + 1) % 10  # one label that disagrees with what was served, for certain
        labels = [wrong_label, *(int(v) for v in y[1:10])]
        for i, label in enumerate(labels):
            send_label(edge.address, MODEL, f"fb-{i}", str(label), token="s3cret", source="app")
        send_label(edge.address, MODEL, "fb-10", json.dumps(str(y[10])), token="s3cret")  # a class name
        send_label(edge.address, MODEL, "fb-11", '{"false_trigger": true}', token="s3cret")  # not a class
        send_label(edge.address, MODEL, "never-served", "3", token="s3cret")  # forgotten, or never known
        correct = sum(int(s == v) for s, v in zip(served[:10], labels, strict=True)) + int(served[10] == y[10])

        def feedback() -> dict:
            found: dict = {}
            for stats in edge.events("stats"):
                for model in stats["models"]:
                    for version, counts in model.get("field", {}).get("feedback", {}).items():
                        total = found.setdefault(version, {"labels": 0, "known": 0, "correct": 0})
                        for key in total:
                            total[key] += counts[key]
            return found

        wait_until(lambda: feedback().get("v1", {}).get("labels") == 12, timeout=30)
        assert feedback() == {"v1": {"labels": 12, "known": 11, "correct": correct}}
        assert correct <= 10  # the deliberately wrong label is not counted right
        registry = edge.app.metrics.registry
        outcomes = {o: registry.get_sample_value("edgeloop_feedback_labels_total", {"model": MODEL, "outcome": o})
                    for o in ("correct", "wrong", "unknown")}
        assert outcomes == {"correct": correct, "wrong": 11 - correct, "unknown": 2}
        logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("edge_runtime.report.field"))
        assert "false_trigger" not in logged and logged == ""
    finally:
        edge.stop()


def test_the_map_of_served_requests_is_bounded_and_forgets_the_oldest_first():
    """``remembered`` ids per model: a label for an id pushed out is of no known version (only the metric counts it,
    as unknown)."""
    from types import SimpleNamespace

    from edgeloop_core.contract import Task

    stats = FieldStatistics(rate=0.0, min_samples=10, remembered=2)
    stats.start()
    manifest = SimpleNamespace(field_baseline=None, task=Task(kind="classification", num_classes=3),
                               labels=["cat", "dog", "fox"])
    model = SimpleNamespace(name="m", version="v1", manifest=manifest)
    for i, top in enumerate((0, 1, 2)):
        logits = np.eye(3, dtype=np.float32)[[top]]
        stats.observe(SimpleNamespace(id=f"r{i}"), model, {"x": logits}, {"logits": logits})
    for request_id, label in (("r0", 0), ("r1", "dog"), ("r2", 0)):
        stats.feedback("m", request_id, label)
    stats.stop()
    assert stats.take("m") == {"feedback": {"v1": {"labels": 2, "known": 2, "correct": 1}}}
    assert stats.take("m") is None  # taken: counts start anew
    assert label_classes([1, "fox"], ["cat", "dog", "fox"], 2) == [1, 2]
    assert label_classes(True, ["a"], 1) is None and label_classes([1], ["a"], 2) is None
