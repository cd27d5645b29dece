"""The fleet as OpenTelemetry metrics: every ``HUB_OTLP_INTERVAL_S`` the hub pushes the latest state of each device
and model (p50/p99 latency, time since last seen, and the count per state) as gauges over OTLP/gRPC to a collector,
so teams chart and alert on the fleet in the Prometheus/Grafana stack they already run.

Exactly one replica exports, so a series never comes from two hubs: the one holding a PostgreSQL session advisory
lock (SQLite has one hub). The others try for the lock at each export; when the exporting replica goes, its lock
goes with its connection and another takes over at its next export. The values come from the database (the
per-device "latest" rows the fleet view reads), so it does not matter which replica received the stats. A
collector that is down costs a warning per export (the OpenTelemetry SDK's exporter retries with back-off); the hub
serves on."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from sqlalchemy import text

from telemetry_hub.store import MIGRATION_LOCK, HubStore

log = logging.getLogger(__name__)

EXPORT_LOCK = MIGRATION_LOCK + 2
"""The advisory lock the exporting replica holds (the migration and retention locks are the two below)."""

EXPORT_TIMEOUT_S = 5


class FleetMetrics:
    """Observable gauges over :class:`HubStore`'s latest rows, exported by an OpenTelemetry ``MeterProvider``."""

    def __init__(self, store: HubStore, endpoint: str, interval_s: float, instance: str | None = None) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._lock_conn: Any = None
        self._snapshot: tuple[float, list[dict[str, Any]]] = (0.0, [])
        # an export that cannot reach the collector gives up after EXPORT_TIMEOUT_S (the next one tries again), so a
        # collector that is down never holds up the hub's stop for long
        exporter = OTLPMetricExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"),
                                      timeout=EXPORT_TIMEOUT_S)
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=int(interval_s * 1000))
        resource = Resource.create({"service.name": "edgeloop-hub",
                                    "service.instance.id": instance or socket.gethostname()})  # the pod's name
        self.provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self.provider.get_meter("edgeloop.hub")
        meter.create_observable_gauge("edgeloop.model.latency.p50", [self._p50], unit="ms",
                                      description="p50 inference latency a device last reported for a model")
        meter.create_observable_gauge("edgeloop.model.latency.p99", [self._p99], unit="ms",
                                      description="p99 inference latency a device last reported for a model")
        meter.create_observable_gauge("edgeloop.device.last_seen.age", [self._age], unit="s",
                                      description="seconds since the hub last heard from a device about a model")
        meter.create_observable_gauge("edgeloop.fleet.models", [self._states], unit="{model}",
                                      description="device and model pairs per state")

    def _rows(self) -> list[dict[str, Any]]:
        """The fleet's latest rows, read once per export (the four callbacks of one collection share them); none
        unless this replica exports."""
        with self._lock:
            read_at, rows = self._snapshot
            if time.monotonic() - read_at > 1.0:
                try:
                    rows = self._read() if self._leading() else []
                except Exception as exc:  # noqa: BLE001 - the database is away: skip this push, try the next
                    log.warning("OTLP export skipped: cannot read the fleet (%s)", exc.__class__.__name__)
                    rows = []
                self._snapshot = (time.monotonic(), rows)
            return rows

    def _read(self) -> list[dict[str, Any]]:
        """Every device and model row (one query: the rows are all kept for this push anyway)."""
        return [r for r in self.store.fleet() if r["model_name"]]

    def _leading(self) -> bool:
        """Whether this replica exports: it holds (or now takes) the export lock."""
        if not self.store.postgresql:
            return True
        if self._lock_conn is not None:
            try:
                self._lock_conn.execute(text("SELECT 1"))
                return True
            except Exception:  # noqa: BLE001 - the connection, and the lock with it, is gone: try again below
                self._release()
        conn = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            taken = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": EXPORT_LOCK}).scalar()
        except Exception:
            conn.close()
            raise
        if taken:
            self._lock_conn = conn
            log.info("this replica exports the fleet's metrics over OTLP")
            return True
        conn.close()  # back to the pool: it holds no lock
        return False

    def _release(self) -> None:
        """Give the export lock up: the session that holds it ends (a pooled connection would keep it alive)."""
        if self._lock_conn is not None:
            try:
                self._lock_conn.invalidate()
                self._lock_conn.close()
            except Exception:
                log.debug("closing the export lock's connection failed", exc_info=True)
            self._lock_conn = None

    def _p50(self, _options: CallbackOptions) -> list[Observation]:
        return self._latency("p50_ms")

    def _p99(self, _options: CallbackOptions) -> list[Observation]:
        return self._latency("p99_ms")

    def _latency(self, field: str) -> list[Observation]:
        return [Observation(r[field], _attributes(r)) for r in self._rows() if r[field] is not None]

    def _age(self, _options: CallbackOptions) -> list[Observation]:
        now_ms = time.time() * 1000
        return [Observation(max(0.0, (now_ms - r["last_seen_ms"]) / 1000), _attributes(r)) for r in self._rows()
                if r["last_seen_ms"]]

    def _states(self, _options: CallbackOptions) -> list[Observation]:
        counts = Counter(row["state"] or "unknown" for row in self._rows())
        return [Observation(n, {"state": state}) for state, n in sorted(counts.items())]

    def close(self) -> None:
        """Export once more, stop, and let another replica take over."""
        try:
            self.provider.shutdown(timeout_millis=EXPORT_TIMEOUT_S * 1000)
        finally:
            with self._lock:
                self._release()


def _attributes(row: dict[str, Any]) -> dict[str, str]:
    """A series per device, model and serving version (the state is not a label: a series would end at every state
    change; ``edgeloop.fleet.models`` counts the states)."""
    return {"device.id": row["device_id"], "model.name": row["model_name"],
            "model.version": row["serving_version"] or ""}
