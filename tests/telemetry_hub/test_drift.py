"""Drift in the fleet view: a device's field statistics (counts in its model's baseline bins, edgeloop_core.drift)
go to the hub in its stats; the hub computes the Jensen-Shannon distance per feature and `fleet status` shows the
largest, marked above the threshold. Real hub, real gRPC, the device's own outbox and sender."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from rich.console import Console
from sklearn.datasets import load_digits

from edge_runtime.report.telemetry import Outbox, TelemetrySender
from edgeloop_core.contract import Task
from edgeloop_core.drift import FieldCounts, build_baseline
from telemetry_hub.cli import fleet_table
from telemetry_hub.server import HubSettings, fleet_status, start_hub
from telemetry_hub.store import HubStore, field_drift

TASK = Task(kind="classification", num_classes=10)


def logits(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.normal(0, 1, (len(labels), 10)).astype(np.float32)
    out[np.arange(len(labels)), labels] += 4.0
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_shifted_device_shows_drift_above_the_threshold_and_a_normal_one_stays_below(backend, tmp_path, request):
    digits = load_digits()
    images, labels = (digits.images / 16.0).astype(np.float32)[:, None], digits.target
    baseline = build_baseline({"input": images[:1200]}, {"logits": logits(labels[:1200], 0)}, TASK)
    field_images, field_labels = images[1200:], labels[1200:]
    shifted = np.clip(field_images * 0.5 + np.random.default_rng(1).normal(0, 0.15, field_images.shape), 0, 1)

    def field(served: np.ndarray) -> dict:
        counts = FieldCounts(baseline)
        for start in range(0, len(served), 8):
            counts.add({"input": served[start:start + 8]}, {"logits": logits(field_labels[start:start + 8], start)},
                       TASK)
        samples = counts.samples
        return {"samples": samples, "counts": counts.take(),
                "baseline": {n: f.proportions for n, f in baseline.features.items()}}

    store = (HubStore(f"sqlite:///{tmp_path / 'hub.sqlite'}") if backend == "sqlite"
             else request.getfixturevalue("own_schema_store"))

    async def scenario():
        settings = HubSettings(database_url="sqlite://", port=0, tokens="cam-ok:t1,cam-dark:t2", read_tokens="reader")
        server, port, _ = await start_hub(settings, store)
        try:
            for device, token, served in (("cam-ok", "t1", field_images), ("cam-dark", "t2", shifted)):
                outbox = Outbox(tmp_path / f"{device}.sqlite", device)
                outbox.add("stats", {"models": [{"model_name": "digits", "state": "serving", "requests": 597,
                                                 "field": field(served)}]})
                sender = TelemetrySender(outbox, f"127.0.0.1:{port}", token)
                assert await sender.flush() == 1
                await sender.close()
                outbox.close()
            return await fleet_status(f"127.0.0.1:{port}", "reader")
        finally:
            await server.stop(0)

    rows = {r.device_id: r for r in asyncio.run(scenario())}
    ok, dark = (json.loads(rows[d].drift_json) for d in ("cam-ok", "cam-dark"))
    assert ok["samples"] == dark["samples"] == len(field_images)
    assert ok["max"] < 0.2 < dark["max"] and dark["feature"].startswith("input:input:c0")
    console = Console(width=400, record=True)
    console.print(fleet_table(list(rows.values())))
    lines = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "cam-" in line}
    assert "DRIFT" in lines["cam-dark"] and "DRIFT" not in lines["cam-ok"]


def test_an_odd_field_payload_is_ignored_never_an_error():
    for odd in (None, [], {"counts": []}, {"counts": {"class": [1, -2]}, "baseline": {"class": [0.5, 0.5]}},
                {"counts": {"class": ["x"]}, "baseline": {"class": [1.0]}}, {"counts": {}, "baseline": {"a": "b"}}):
        assert field_drift(odd) is None
    assert field_drift({"samples": 4, "counts": {"class": [2, 2]}, "baseline": {"class": [0.5, 0.5]}})["max"] == 0.0
