"""Batch-size tuning on the device: a real sweep on a small model, and limits that respect the budget."""

from __future__ import annotations

import pytest

from edge_runtime.build.tuning import BatchPoint, batch_sizes, choose, sweep
from edgeloop_core.errors import ConfigError
from tests.edge_runtime.conftest import RunningEdge, publish_model


def test_batch_sizes_double_up_to_the_maximum():
    assert batch_sizes(16) == [1, 2, 4, 8, 16]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]
    assert batch_sizes(1) == [1]


def test_sweep_on_a_real_engine_and_limits_within_the_budget(trained):
    from edge_runtime.build.engines.onnxruntime import OrtEngine

    engine = OrtEngine(trained.good["int8-ort"], max_batch_size=32)
    points = sweep(engine, {"input": trained.x_val[:1]}, 32, runs=15)
    assert [p.batch for p in points] == [1, 2, 4, 8, 16, 32]
    assert all(p.p99_ms >= p.p50_ms > 0 for p in points)
    assert points[-1].samples_per_s > points[0].samples_per_s  # batching pays on this device
    # a budget between batch 4's and batch 32's p99 must stop below 32, and never exceed the budget
    budget = (points[2].p99_ms + points[-1].p99_ms) / 2
    chosen = choose(points, budget, max_queue_delay_us=2000)
    picked = next(p for p in points if p.batch == chosen.max_batch_size)
    assert picked.p99_ms <= budget and chosen.expected_worst_ms <= budget + 1e-9
    assert all(p.p99_ms > budget for p in points if p.batch > chosen.max_batch_size)


def test_each_batch_size_gets_its_energy_per_inference_on_a_recorded_orin(trained, tmp_path):
    """The recorded Orin NX tree (tests/data/sysfs-orin-nx: the real INA3221 paths and labels, see its SOURCE.md) at a
    steady draw: energy per inference is power x time per sample, so batching that pays in time pays in energy."""
    import shutil
    from pathlib import Path

    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.build.power import PowerSampler

    root = tmp_path / "orin"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "sysfs-orin-nx", root)
    engine = OrtEngine(trained.good["int8-ort"], max_batch_size=32)
    points = sweep(engine, {"input": trained.x_val[:1]}, 32, runs=15, power=PowerSampler(root, period_s=0.005))
    assert all(p.mj_per_inference is not None and p.mj_per_inference > 0 for p in points)
    assert points[-1].mj_per_inference < points[0].mj_per_inference
    milliwatts = 5008 * 926 / 1000  # VDD_IN as recorded
    for p in points:
        assert 0.3 < p.mj_per_inference / (milliwatts * p.p50_ms / 1e3 / p.batch) < 10  # mean vs median time
    bare = sweep(engine, {"input": trained.x_val[:1]}, 2, runs=3, power=PowerSampler(tmp_path / "no-rails"))
    assert [p.mj_per_inference for p in bare] == [None, None]  # absent, never 0


def test_choice_rules():
    points = [BatchPoint(1, 1.0, 1.5, 1000), BatchPoint(2, 1.2, 1.8, 1600), BatchPoint(4, 2.0, 3.5, 2000)]
    generous = choose(points, 10.0, max_queue_delay_us=500)
    assert (generous.max_batch_size, generous.max_queue_delay_us) == (4, 500)  # delay capped by the setting
    tight = choose(points, 2.0, max_queue_delay_us=5000)
    assert tight.max_batch_size == 2 and 199 <= tight.max_queue_delay_us <= 200  # 1.8 ms + ~0.2 ms = the budget
    assert tight.expected_worst_ms <= 2.0  # rounded down, never over
    impossible = choose(points, 1.0, max_queue_delay_us=500)
    assert (impossible.max_batch_size, impossible.max_queue_delay_us) == (1, 0) and "over" in impossible.reason
    with pytest.raises(ConfigError):
        choose(points, 0.0, max_queue_delay_us=500)


@pytest.mark.integration
def test_runtime_tunes_its_batcher_and_reports_the_curve(store, signing_key, trained, edge_settings):
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, batching_budget_ms=50.0, max_batch_size=16))
    try:
        edge.wait_ready()
        (sweep_event,) = edge.events("batch_sweep")
        chosen = sweep_event["chosen"]
        assert [p["batch"] for p in sweep_event["points"]] == [1, 2, 4, 8, 16]
        assert chosen["expected_worst_ms"] <= 50.0
        batcher = edge.app.runtime.serving.batcher
        assert (batcher.max_batch_size, round(batcher.delay_s * 1e6)) == (chosen["max_batch_size"],
                                                                          chosen["max_queue_delay_us"])
        assert edge.app.runtime.status()["batching"]["max_batch_size"] == chosen["max_batch_size"]
    finally:
        edge.stop()
