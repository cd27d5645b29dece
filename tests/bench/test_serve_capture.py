"""What ``bench/serve.py``'s capture rows (issue 26) read and state: the capture counters from an edgeloop
Prometheus page as the runtime writes it, and the targets (1% costs ≤ 5% of throughput, 100% ≤ 30%, same run) PASS
or FAIL from the run's own rows, with what 100% dropped and why."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from bench.serve import capture_acceptance, capture_counters, capture_tables
from edge_runtime.report.capture.metrics import CaptureMetrics
from edge_runtime.report.metrics import RuntimeMetrics


def _page() -> str:
    """A metrics page from the runtime's own metric objects (names and labels as the device serves them)."""
    registry = CollectorRegistry()
    metrics = CaptureMetrics(registry)
    metrics.captured.labels("small", "sample").inc(900)
    metrics.captured.labels("small", "margin").inc(10)
    metrics.captured.labels("other", "sample").inc(5)  # another model: not counted
    metrics.dropped.labels("small", "queue_full").inc(90)
    metrics.dropped.labels("small", "spool_full").inc(3)
    metrics.uploaded.labels("items").inc(907)
    metrics.uploaded.labels("shards").inc(2)
    edge = RuntimeMetrics()
    edge.requests.labels("small", "OK").inc(1000)
    edge.requests.labels("small", "INVALID_ARGUMENT").inc(7)
    return generate_latest(registry).decode() + generate_latest(edge.registry).decode()


def test_capture_counters_read_the_runtime_metrics_page():
    found = capture_counters(_page(), "small")
    assert found == {"served": 1000, "captured": 910, "dropped:queue_full": 90, "dropped:spool_full": 3,
                     "uploaded": 907, "shards": 2}


def _row(capture: str, rps: float, served: float = 1000, captured: float = 0, queue_full: float = 0):
    counts = {"served": served, "captured": captured, "dropped:queue_full": queue_full}
    return {"model": "small", "capture": capture, "concurrency": 32, "rps": rps, "p50": 5.0, "p99": 9.0,
            "cpu_us": 200.0, "counts": counts, "rounds": [rps], "uploaded": captured,
            "captured_total": captured, "shards_in_s3": 2}


def test_capture_targets_pass_and_fail_by_the_rows():
    rows = [_row("off", 5000), _row("1%", 4800, captured=10), _row("100%", 3400, captured=950, queue_full=50)]
    lines = capture_acceptance(rows)
    assert ": PASS (0.96x capture off's req/s, same run)" in lines[0] and "capture at 1%" in lines[0]
    assert ": FAIL (0.68x capture off's req/s, same run)" in lines[1] and "≤ 30% of throughput" in lines[1]
    assert "captured 95.0% of the requests (950 of 1000); dropped: queue_full 50" in lines[2]
    assert "serving never" not in lines[2] and "request path never waits" in lines[2]
    rows = [_row("off", 5000), _row("1%", 4700, captured=10), _row("100%", 3600, captured=1000)]
    lines = capture_acceptance(rows)
    assert ": FAIL (0.94x" in lines[0] and ": PASS (0.72x" in lines[1]
    assert "captured every request (1000 of 1000); dropped: 0" in lines[2] and "request path" not in lines[2]


def test_a_missing_row_is_not_measured_and_the_table_shows_each_ratio():
    lines = capture_acceptance([_row("1%", 4800)])
    assert lines[0].endswith(": not measured (no rows)") and len(lines) == 2
    table = capture_tables([_row("off", 5000), _row("100%", 4000, captured=990, queue_full=10)], rounds=1)
    assert "| small | 100% | 32 | 4000 | 0.80x |" in table and "| queue_full 10 | 990 ÷ 990 (2) |" in table
    assert "| small | off | 32 | 5000 | 1.00x |" in table
