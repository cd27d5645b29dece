"""Field capture's Prometheus metrics, registered in the runtime's registry (served on ``metrics_port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

DROP_REASONS = ("queue_full", "disk_floor", "budget_items", "budget_bytes", "spool_full", "error")
"""Why a capture was dropped: the worker's queue was full (serving never waits), the spool's disk fell below the
policy's free-space floor, the hourly item or daily byte budget was spent, the spool hit its cap (oldest dropped),
or the item could not be made or written (logged)."""


class CaptureMetrics:
    """Counters and gauges of field capture (``registry``: the runtime's; a fresh one when not given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.registry = registry
        self.captured = Counter("edgeloop_capture_items", "requests captured into the spool, by the policy that "
                                "fired (sample, drift_burst, margin, entropy, uncertain_band, expression, entry_point)",
                                ["model", "policy"], registry=registry)
        self.dropped = Counter("edgeloop_capture_dropped", "captures dropped, by reason (see DROP_REASONS)",
                               ["model", "reason"], registry=registry)
        self.uploaded = Counter("edgeloop_capture_uploaded", "captured data uploaded to S3: shards, items in them, "
                                "label records", ["kind"], registry=registry)
        self.labels = Counter("edgeloop_capture_labels", "labels received, by outcome (joined, record)",
                              ["outcome"], registry=registry)
        self.spool_bytes = Gauge("edgeloop_capture_spool_bytes", "bytes the capture spool holds on disk",
                                 registry=registry)
        self.stopped = Gauge("edgeloop_capture_stopped", "1 while capture of a model is stopped, by reason "
                             "(disk_floor)", ["model", "reason"], registry=registry)
        self.bursts = Counter("edgeloop_capture_bursts", "capture bursts started because the model's field "
                              "statistics drifted from its baseline (policy drift_burst)", ["model"], registry=registry)
        self.burst_active = Gauge("edgeloop_capture_burst_active", "1 while a model's drift burst lasts",
                                  ["model"], registry=registry)
        self.upload_failing = Gauge("edgeloop_capture_upload_failing", "1 while uploads to S3 fail (retried with "
                                    "back-off)", registry=registry)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent): for stats and tests."""
        found = self.registry.get_sample_value(name, labels)
        return float(found or 0.0)
