"""Raw stats kept for a short window and rolled up per device and model, per 5 minutes and per hour: exactly once
(re-run, late events, replicas rolling up together), read back from the finest tier still kept, at a footprint per
device-day measured on the real PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from telemetry_hub.store import ROLLUP_LAG_MS, HubStore, IncomingEvent, rollups

BUCKET = 300_000
HOUR = 3_600_000


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return HubStore(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    return request.getfixturevalue("own_schema_store")


def stats_event(ts_ms: int, **models: dict) -> IncomingEvent:
    """A stats event as the runtime sends it: every model's status and figures under ``models``."""
    return IncomingEvent(str(uuid.uuid4()), "stats", ts_ms, json.dumps({"ready": True, "models": [
        {"model_name": name, **figures} for name, figures in models.items()]}))


def rows(store: HubStore, tier: str) -> dict[tuple[str, str, int], dict]:
    with store.engine.connect() as conn:
        return {(r.device_id, r.model_name, r.bucket_ms): dict(r._mapping)
                for r in conn.execute(rollups[tier].select())}


def test_stats_roll_up_once_per_device_model_and_bucket_late_ones_included(store):
    now = int(time.time() * 1000)
    start = (now - 2 * HOUR) // HOUR * HOUR  # two hours ago, on the hour: 24 five-minute buckets
    for device in ("jetson-1", "jetson-2"):
        store.ingest(device, [stats_event(start + i * 30_000, **{
            "digits-cnn": {"state": "serving", "serving_version": f"v{i // 120 + 1}", "requests": 10,
                           "p50_ms": 1.0 + i % 2, "p99_ms": float(i % 10)},
            "kws": {"state": "serving", "requests": 1, "p50_ms": None, "p99_ms": None}}) for i in range(240)])
    later = int(time.time() * 1000) + ROLLUP_LAG_MS + 1  # everything stored has arrived long enough ago
    assert store.roll_up(now_ms=later)["rows"] == 480
    assert store.roll_up(now_ms=later)["rows"] == 0  # nothing twice
    fine = rows(store, "stats_5m")
    assert len(fine) == 2 * 2 * 24
    one = fine[("jetson-1", "digits-cnn", start)]
    assert (one["samples"], one["requests"], one["p50_ms_sum"] / one["p50_count"], one["p99_ms_max"]) == \
        (10, 100, 1.5, 9.0)
    assert (one["state"], one["serving_version"]) == ("serving", "v1")
    hourly = rows(store, "stats_1h")
    assert hourly[("jetson-2", "digits-cnn", start + HOUR)]["serving_version"] == "v2"
    assert sum(r["samples"] for r in hourly.values()) == 2 * 2 * 240
    assert hourly[("jetson-1", "kws", start)]["p99_ms_max"] is None  # no latency reported: none made up
    # a device offline for an hour sends a stats event stamped in a bucket already rolled up: it is added to it,
    # and, being older than the bucket's latest, leaves the bucket's state and version alone
    store.ingest("jetson-1", [stats_event(start + 1, **{"digits-cnn": {"state": "failed", "serving_version": "v0",
                                                                       "requests": 5, "p99_ms": 50.0}})])
    assert store.roll_up(now_ms=int(time.time() * 1000) + ROLLUP_LAG_MS + 1)["rows"] == 1
    merged = rows(store, "stats_5m")[("jetson-1", "digits-cnn", start)]
    assert (merged["samples"], merged["requests"], merged["p99_ms_max"]) == (11, 105, 50.0)
    assert (merged["state"], merged["serving_version"]) == ("serving", "v1")
    series = store.stats_series("jetson-1", "digits-cnn", start, start + 2 * HOUR)
    assert [p["bucket_ms"] for p in series] == [start + i * BUCKET for i in range(24)]
    assert series[0]["p99_ms"] == 50.0 and series[0]["period_ms"] == BUCKET


def test_raw_stats_go_after_their_window_only_once_rolled_up_and_old_buckets_are_read_hourly(store):
    now = int(time.time() * 1000)
    old = now - 20 * 86_400_000 + HOUR  # older than the 5-minute tier keeps (14 days), within the hourly one (90)
    store.stats_retention_days = 30  # ...accepted at ingest as if the window were wider, to get a row that old
    store.apply_retention()  # (PostgreSQL: with its day's partition)
    ahead = now + 10 * 60_000  # a device clock ten minutes ahead
    store.ingest("jetson-1", [stats_event(old, m={"requests": 3}), stats_event(now - 2 * HOUR, m={"requests": 4}),
                              stats_event(ahead, m={"requests": 5})])
    store.stats_retention_days = 14
    assert store.roll_up(now_ms=now)["trimmed"] == 0  # arrived just now: not rolled up yet, nothing trimmed
    assert store.count_events("jetson-1", "stats") == 3
    done = store.roll_up(now_ms=int(time.time() * 1000) + HOUR + 1000)
    assert done["rows"] == 3 and done["trimmed"] == 2  # the one stamped ahead is still inside its raw hour
    assert store.count_events("jetson-1", "stats") == 1
    series = store.stats_series("jetson-1", "m", old - HOUR, now + HOUR)
    assert [(p["period_ms"], p["requests"]) for p in series] == [(HOUR, 3), (BUCKET, 4), (BUCKET, 5)]


def test_a_payload_the_hub_cannot_read_is_a_sample_and_does_not_stop_the_rollup(store):
    """A device's stats payload that does not parse, or holds odd values, is counted as what can be read of it; the
    rollup goes on past it (it would stop the watermark forever otherwise)."""
    now = int(time.time() * 1000)
    odd = [IncomingEvent(str(uuid.uuid4()), "stats", now, "not json {"),
           IncomingEvent(str(uuid.uuid4()), "stats", now + 1, json.dumps(
               {"models": [5, {"model_name": "m", "p50_ms": "fast", "p99_ms": True, "requests": -3}]})),
           stats_event(now + 2, m={"requests": 2.7, "p50_ms": 1, "state": ["x"]})]
    store.ingest("jetson-odd", odd)
    assert store.roll_up(now_ms=int(time.time() * 1000) + ROLLUP_LAG_MS + 1)["rows"] == 3
    fine = {m: r for (_, m, _), r in rows(store, "stats_5m").items()}
    assert fine[""]["samples"] == 1 and fine[""]["requests"] == 0
    assert (fine["m"]["samples"], fine["m"]["requests"], fine["m"]["p50_count"], fine["m"]["p99_ms_max"]) == \
        (2, 2, 1, None)
    assert fine["m"]["state"] == '["x"]'  # a value that is no string, as JSON


def test_replicas_rolling_up_together_count_every_event_once(own_schema_store):
    """A backlog of 40 slices (a hub that was down for three hours), rolled up by three replicas at once: each slice
    is added by one of them, once (the watermark row is locked while a slice is added)."""
    from telemetry_hub.store import ROLLUP_SLICE_MS, stats

    url = own_schema_store.engine.url.render_as_string(hide_password=False)
    now = int(time.time() * 1000)
    arrived = now - 40 * (ROLLUP_SLICE_MS + 1)
    with own_schema_store.engine.begin() as conn:  # as ingests over those three hours left them
        conn.execute(stats.insert(), [
            {"id": str(uuid.uuid4()), "device_id": f"jetson-{i % 10}", "ts_ms": now - i * 1000,
             "payload": json.dumps({"models": [{"model_name": "m", "requests": 1}]}),
             "received_ms": arrived + (i % 40) * (ROLLUP_SLICE_MS + 1)} for i in range(1000)])
    replicas = [HubStore(url) for _ in range(3)]
    results, errors = [], []

    def roll(replica: HubStore) -> None:
        try:
            results.append(replica.roll_up(now_ms=now + ROLLUP_LAG_MS + 1))
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=roll, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for replica in replicas:
        replica.engine.dispose()
    assert errors == [] and sum(r["rows"] for r in results) == 1000 and sum(r["slices"] for r in results) == 40
    assert sum(r["requests"] for r in rows(own_schema_store, "stats_5m").values()) == 1000
    assert sum(r["requests"] for r in rows(own_schema_store, "stats_1h").values()) == 1000


def test_the_stats_footprint_per_device_day_is_a_tenth_of_raw_or_less(own_schema_store):
    """Measured on PostgreSQL with the runtime's stats as a Jetson sends them every 30 s: a device-day held as
    5-minute and hourly rollups (plus the raw hour) costs ≤ 10% of what raw stats did."""
    from telemetry_hub.footprint import TYPICAL_STATS_PAYLOAD, bytes_per_row, per_device_day

    store = own_schema_store
    now = int(time.time() * 1000)
    start = (now - 4 * HOUR) // HOUR * HOUR
    for n in range(12):  # 12 devices, four hours at 30 s: 5,760 raw rows, 576 five-minute ones
        store.ingest(f"jetson-{n:04d}", [IncomingEvent(str(uuid.uuid4()), "stats", start + i * 30_000,
                                                       TYPICAL_STATS_PAYLOAD) for i in range(480)])
    store.roll_up(now_ms=int(time.time() * 1000) + ROLLUP_LAG_MS + 1)
    sizes = bytes_per_row(store)
    assert 800 < sizes["stats"] < 2000 and sizes["stats_5m"] < 400, sizes
    day = per_device_day(sizes, raw_retention_hours=1.0, fine_days=14)
    assert day["ratio"] <= 0.10, (sizes, day)


def test_the_hub_rolls_up_in_its_background_loop_and_a_failed_pass_is_logged_and_retried(tmp_path, caplog):
    import asyncio
    import logging

    from telemetry_hub.server import HubSettings, start_hub

    class FlakyStore(HubStore):
        """The real store; its first rollup pass fails (a database gone for a moment), later ones see what arrived
        as older than the rollup's lag."""

        passes = 0

        def roll_up(self, now_ms=None):
            self.passes += 1
            if self.passes == 1:
                raise RuntimeError("the database went away for a moment")
            return super().roll_up(now_ms=int(time.time() * 1000) + ROLLUP_LAG_MS + 1)

    store = FlakyStore(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    store.ingest("jetson-1", [stats_event(int(time.time() * 1000), m={"requests": 7})])

    async def scenario():
        settings = HubSettings(database_url="sqlite://", port=0, tokens="jetson-1:tok", rollup_interval_s=0.05)
        server, _, _ = await start_hub(settings, store)
        try:
            for _ in range(100):
                if rows(store, "stats_5m"):
                    return
                await asyncio.sleep(0.05)
        finally:
            await server.stop(0)

    with caplog.at_level(logging.WARNING, logger="telemetry_hub.server"):
        asyncio.run(scenario())
    assert [r["requests"] for r in rows(store, "stats_5m").values()] == [7]
    assert store.passes >= 2 and any("stats rollup failed" in r.getMessage() for r in caplog.records)
