"""What stats cost to store, per device-day, measured on PostgreSQL (``pg_total_relation_size`` of each table, its
indexes and TOAST included, over its rows): raw stats as the hub kept them for 14 days before rollups, against raw
stats for a short window plus 5-minute and hourly rollups. Used by ``bench/hub.py`` and its test."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sqlalchemy import func, select, text

from telemetry_hub.store import ROLLUP_PERIODS_MS, rollups, stats

if TYPE_CHECKING:
    from telemetry_hub.store import HubStore

DAY_S = 86_400
STATS_INTERVAL_S = 30
"""How often a device sends stats (the runtime's ``EDGE_TELEMETRY_INTERVAL_S``, 30 s): 2,880 raw rows a day."""
TYPICAL_STATS_PAYLOAD = json.dumps({
    "ready": True,
    "models": [{"model_name": "digits-cnn", "desired_version": "2026-12-01T0930-7f3a", "serving_version":
                "2026-12-01T0930-7f3a", "state": "serving", "target_key": "trt10.3.0-sm87-orin-nx-l4t36.4-int8-b1-8",
                "validation": {"passed": True, "metric": "top1_accuracy", "value": 0.9944, "reference": 0.9951,
                               "tolerance": 0.01, "variant": "int8-qdq"},
                "channel": "stable", "requests": 1834, "p50_ms": 0.412, "p99_ms": 1.387, "errors": 0,
                "batching": {"max_batch_size": 8, "max_queue_delay_us": 500}}],
    "jetson": {"gpu_utilization_pct": 37.5, "gpu_freq_mhz": 624.8, "ram_used_mb": 3121, "ram_total_mb": 7620,
               "temperatures_c": {"cpu": 48.2, "gpu": 47.1, "soc0": 46.9, "soc1": 47.3, "soc2": 46.5, "tj": 48.6},
               "power_mw": {"VDD_IN": 6412, "VDD_CPU_GPU_CV": 1837, "VDD_SOC": 1524}, "unavailable": {}},
    "telemetry_dropped": 0, "telemetry_errors": 0})
"""A stats event of a Jetson serving one model, as the runtime sends it (about 950 bytes of JSON)."""


def bytes_per_row(store: HubStore) -> dict[str, float]:
    """Bytes per row of raw stats (``stats``, every partition) and of each rollup tier, from PostgreSQL's own
    relation sizes (heap, indexes, TOAST) over the rows each holds; a table with no rows is left out."""
    if not store.postgresql:
        raise ValueError("bytes per row are measured on PostgreSQL")
    sizes: dict[str, float] = {}
    with store.engine.connect() as conn:
        raw = conn.execute(text("SELECT COALESCE(SUM(pg_total_relation_size(relid)), 0) "
                                "FROM pg_partition_tree('stats'::regclass)")).scalar_one()
        for name, table, size in (("stats", stats, raw), *(
                (n, t, conn.execute(text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": n}).scalar_one())
                for n, t in rollups.items())):
            count = conn.execute(select(func.count()).select_from(table)).scalar_one()
            if count:
                sizes[name] = float(size) / count
    return sizes


def per_device_day(sizes: dict[str, float], *, raw_retention_hours: float, fine_days: int, models: int = 1,
                   interval_s: float = STATS_INTERVAL_S) -> dict[str, float]:
    """Bytes per device-day at steady state, from :func:`bytes_per_row`: ``raw`` (every stats event kept, as
    before rollups), ``rolled_up`` (per day of the ``fine_days`` held at 5 minutes: its 5-minute and hourly rows,
    plus the raw window spread over those days), ``hourly`` (per day held at an hour only), and ``ratio``
    (rolled_up ÷ raw)."""
    raw = DAY_S / interval_s * sizes["stats"]
    window = raw_retention_hours * 3600 / interval_s * sizes["stats"]  # bytes per device, whatever the days held
    hourly = DAY_S * 1000 / ROLLUP_PERIODS_MS["stats_1h"] * models * sizes["stats_1h"]
    fine = DAY_S * 1000 / ROLLUP_PERIODS_MS["stats_5m"] * models * sizes["stats_5m"]
    rolled_up = fine + hourly + window / fine_days
    return {"raw": raw, "rolled_up": rolled_up, "hourly": hourly, "ratio": rolled_up / raw}
