"""Drift, device to fleet view: two real runtimes serve the digits model whose manifest carries the training data's
field baseline; one is fed the held-out digits, the other the same digits as a camera that lost half its light and
gained sensor noise. Each counts what it serves (off the request path) and sends the counts in its stats; the real
hub computes the Jensen-Shannon distance, and `fleet status` marks only the shifted device."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import onnxruntime as ort
from rich.console import Console

from edgeloop_core.contract import Task
from edgeloop_core.drift import build_baseline
from telemetry_hub.cli import fleet_table
from telemetry_hub.server import HubSettings, fleet_status, start_hub
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until
from tests.edge_runtime.test_capture_drift_burst import serve


def test_a_device_fed_a_shifted_distribution_shows_drift_in_fleet_status_and_one_fed_the_training_one_does_not(
        store, signing_key, trained, edge_settings, tmp_path):
    from components.data import load_digits_dataset

    train = load_digits_dataset().x_train.astype(np.float32)
    session = ort.InferenceSession(str(trained.good["fp32"]), providers=["CPUExecutionProvider"])
    baseline = build_baseline({"input": train}, {"logits": session.run(None, {"input": train})[0]},
                              Task(kind="classification", num_classes=10))
    publish_model(store, signing_key, trained, "v1", field_baseline=baseline)

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_hub_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    hub = HubSettings(database_url=f"sqlite:///{tmp_path / 'hub.sqlite'}", port=0, tokens="cam-ok:t1,cam-dark:t2",
                      read_tokens="reader")
    server, port, _ = on_hub_loop(start_hub(hub))
    edges = {device: RunningEdge(edge_settings(store.bucket, device_id=device, hub_address=f"127.0.0.1:{port}",
                                               hub_token=token, telemetry_interval_s=0.3, field_stats_rate=1.0,
                                               field_stats_min_samples=300, cache_dir=tmp_path / device))
             for device, token in (("cam-ok", "t1"), ("cam-dark", "t2"))}
    held_out = trained.x_val  # the digits the model never trained on: the training distribution
    dark = np.clip(held_out * 0.5 + np.random.default_rng(1).normal(0, 0.15, held_out.shape), 0, 1)
    try:
        for edge in edges.values():
            edge.wait_ready()
        serve(edges["cam-ok"].address, held_out, batch=4)
        serve(edges["cam-dark"].address, dark, batch=4)

        def drifts():
            rows = on_hub_loop(fleet_status(f"127.0.0.1:{port}", "reader"))
            return {r.device_id: r for r in rows if r.drift_json}

        wait_until(lambda: len(drifts()) == 2, timeout=30)
        rows = drifts()
        ok, shifted = (json.loads(rows[d].drift_json) for d in ("cam-ok", "cam-dark"))
        assert 300 <= ok["samples"] <= len(held_out) and 300 <= shifted["samples"] <= len(held_out)  # min_samples
        assert ok["max"] < 0.2 < shifted["max"], (ok, shifted)
        console = Console(width=400, record=True)
        console.print(fleet_table(list(rows.values())))
        lines = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "cam-" in line}
        assert "DRIFT" in lines["cam-dark"] and "DRIFT" not in lines["cam-ok"]
        for edge in edges.values():  # only counts per bin left the device: no input values in any stats event
            for stats in edge.events("stats"):
                for model in stats["models"]:
                    assert set(model.get("field", {})) <= {"samples", "version", "counts", "baseline", "moments"}
    finally:
        for edge in edges.values():
            edge.stop()
        on_hub_loop(server.stop(0))
        loop.call_soon_threadsafe(loop.stop)
