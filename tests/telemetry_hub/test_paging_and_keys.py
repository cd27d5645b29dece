"""The hub at fleet scale, on the real PostgreSQL (and SQLite where it can say something): paging the fleet reads
one index range per page, and events are keyed by device and id."""

from __future__ import annotations

import asyncio
import re

import pytest
import sqlalchemy
from sqlalchemy import event as sa_event
from sqlalchemy import text

from telemetry_hub.server import HubSettings, fleet_pages, start_hub
from telemetry_hub.store import HubStore, device_models, devices

FLEET = 20_000


def fill_fleet(store: HubStore) -> set[tuple[str, str]]:
    """FLEET devices: most serve one model, every third two, every tenth none yet. Returns the fleet's rows."""
    rows = {(f"jetson-{i:06d}", m) for i in range(FLEET) if i % 10 for m in (("a", "b") if i % 3 == 0 else ("a",))}
    with store.engine.begin() as conn:
        conn.execute(devices.insert(), [{"device_id": f"jetson-{i:06d}", "last_seen_ms": i, "facts_json": "{}"}
                                        for i in range(FLEET)])
        conn.execute(device_models.insert(), [{"device_id": d, "model_name": m, "state": "serving"}
                                              for d, m in sorted(rows)])
        if store.postgresql:
            conn.execute(text("ANALYZE devices"))
            conn.execute(text("ANALYZE device_models"))
    return rows | {(f"jetson-{i:06d}", "") for i in range(0, FLEET, 10)}


def test_a_page_deep_in_the_fleet_is_an_index_range_scan(own_schema_store):
    """The page after device 16,002 reads from that key on in both primary keys' indexes: no Seq Scan, no Sort of
    the whole table, a few buffers (a key on COALESCE(model_name, '') used no index: it read every row before)."""
    store = own_schema_store
    fill_fleet(store)
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    sa_event.listen(store.engine, "before_cursor_execute", capture)
    rows = store.fleet(limit=501, after=("jetson-016002", "a"))
    sa_event.remove(store.engine, "before_cursor_execute", capture)
    assert [(r["device_id"], r["model_name"]) for r in rows[:2]] == [("jetson-016002", "b"), ("jetson-016003", "a")]
    ((statement, parameters),) = sent
    with store.engine.connect() as conn:
        plan = "\n".join(r[0] for r in conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters))
    assert "Seq Scan" not in plan, plan
    assert not any(re.match(r"\s*(->\s+)?Sort\s+\(", line) for line in plan.splitlines()), plan  # Incremental: fine
    conditions = [line for line in plan.splitlines() if "Index Cond" in line]
    assert any("jetson-016002" in line for line in conditions), plan  # the key bounds the index range
    buffers = int(plan.split("Buffers: shared hit=")[1].split()[0])
    assert buffers < 100, plan  # the page's own rows, not the 16,000 devices before it


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_paging_the_fleet_returns_every_row_once_with_the_counts_on_the_first_page(backend, tmp_path, request):
    store = (HubStore(f"sqlite:///{tmp_path / 'hub.sqlite'}") if backend == "sqlite"
             else request.getfixturevalue("own_schema_store"))
    expected = fill_fleet(store)

    async def scenario():
        settings = HubSettings(database_url="sqlite://", port=0, tokens="jetson-1:tok", read_tokens="reader")
        server, port, _ = await start_hub(settings, store)
        try:
            return [p async for p in fleet_pages(f"127.0.0.1:{port}", "reader", page_size=997)]
        finally:
            await server.stop(0)

    pages = asyncio.run(scenario())
    seen = [(d.device_id, d.model_name) for p in pages for d in p.devices]
    assert len(seen) == len(expected) and set(seen) == expected and seen == sorted(seen)
    assert pages[0].total == len(expected) and pages[0].state_counts["serving"] == len(expected) - FLEET // 10
    assert all(p.total == 0 and not p.state_counts for p in pages[1:])  # counted once, with the first page


def migrate_to(url: str, revision: str) -> None:
    """The hub's schema at ``revision`` (as an older hub left it)."""
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    import telemetry_hub.store

    config = Config()
    config.set_main_option("script_location", str(Path(telemetry_hub.store.__file__).with_name("migrations")))
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_same_event_id_from_two_devices_is_kept_for_each(backend, tmp_path, request):
    """Two devices cloned from one image send the same event ids: each device's events are stored (they were keyed
    by id alone: the second device's were taken for resends and dropped). A resend is still stored once, and the
    events a hub of the previous schema stored are kept by the migration."""
    from tests.telemetry_hub.test_hub import event

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'hub.sqlite'}"
    else:
        url = request.getfixturevalue("own_schema_store").engine.url.render_as_string(hide_password=False)
        with sqlalchemy.create_engine(url).begin() as conn:  # the fixture's hub, back to an empty schema
            conn.execute(text("DROP TABLE alembic_version, events, stats, device_models, devices, stats_5m, stats_1h, "
                              "rollup_state CASCADE"))
    migrate_to(url, "0003")
    old_change, old_stats = event("serving", 1, version="v1"), event("stats", 2, state="serving")
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # what the previous hub stored
        if backend == "postgresql":  # the day's partition, as the previous hub's retention made it
            from telemetry_hub.store import DAY_MS, _partition_name

            day = old_stats.timestamp_ms // DAY_MS
            conn.execute(text(f"CREATE TABLE {_partition_name(day)} PARTITION OF stats FOR VALUES FROM "
                              f"({day * DAY_MS}) TO ({(day + 1) * DAY_MS})"))
        conn.execute(text("INSERT INTO events VALUES (:id, 'jetson-old', :kind, :ts, :payload, 0)"),
                     {"id": old_change.id, "kind": old_change.kind, "ts": old_change.timestamp_ms,
                      "payload": old_change.payload_json})
        conn.execute(text("INSERT INTO stats VALUES (:id, 'jetson-old', :ts, :payload, 0)"),
                     {"id": old_stats.id, "ts": old_stats.timestamp_ms, "payload": old_stats.payload_json})
    engine.dispose()
    store = HubStore(url)
    try:
        assert store.migrate() == "0008" and store.count_events("jetson-old") == 2
        batch = [event("validated", 3, version="v2", passed=True), event("serving", 4, version="v2"),
                 event("stats", 5, state="serving", p50_ms=0.4), old_change]
        assert store.ingest("jetson-a", batch)[:2] == ([e.id for e in batch], 0)
        assert store.ingest("jetson-b", batch)[:2] == ([e.id for e in batch], 0)  # its clone: the same ids, all new
        assert store.count_events("jetson-a") == store.count_events("jetson-b") == 4
        assert store.ingest("jetson-b", batch[1:3])[:2] == ([e.id for e in batch[1:3]], 2)  # a resend: stored once
        # two calls of one device in one group carrying the same id: new for the first only
        twice = store.ingest_many([("jetson-c", batch[:1]), ("jetson-c", batch[:1]), ("jetson-d", batch[:1])])
        assert [r.duplicates for r in twice] == [0, 1, 0]
        assert store.count_events("jetson-b") == 4 and store.count_events("jetson-c") == 1
        assert store.count_events("jetson-old") == 2
        assert {r["device_id"]: r["state"] for r in store.fleet()}["jetson-b"] == "serving"
    finally:
        store.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_stats_out_of_the_window_are_counted_with_the_device_clock_skew(backend, tmp_path, request):
    """Stats stamped 20 days old or 10 days ahead are acknowledged and not kept (as before), but no longer silently:
    the device's row counts them, over calls and within one group, and shows how far its clock is off."""
    from tests.telemetry_hub.test_hub import event

    store = (HubStore(f"sqlite:///{tmp_path / 'hub.sqlite'}") if backend == "sqlite"
             else request.getfixturevalue("own_schema_store"))
    day = 86_400_000
    old, ahead = event("stats", -20 * day, state="serving"), event("stats", 10 * day, state="serving")
    ids, duplicates, *_ = store.ingest("jetson-skewed", [old, event("stats", 1, state="serving")])
    assert len(ids) == 2 and duplicates == 0 and store.count_events("jetson-skewed") == 1
    store.ingest_many([("jetson-skewed", [ahead]), ("jetson-ok", [event("stats", 2, state="serving")])])
    rows = {r["device_id"]: r for r in store.fleet()}
    assert rows["jetson-skewed"]["stats_out_of_window"] == 2 and rows["jetson-ok"]["stats_out_of_window"] == 0
    assert 9 * day < rows["jetson-skewed"]["clock_skew_ms"] < 11 * day  # its last call: stamped 10 days ahead
    assert abs(rows["jetson-ok"]["clock_skew_ms"]) < day


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_device_is_told_its_stats_were_not_kept_and_the_fleet_shows_its_skew(backend, tmp_path, request,
                                                                                  caplog):
    """The acknowledgement says how many of the call's stats the hub dropped (and the call's skew); the runtime's
    sender warns once while that goes on (no event contents in the log) and says when it ends; FleetStatus and the
    `fleet status` table show the device's count and clock skew."""
    import logging

    from rich.console import Console

    from edge_runtime.report.telemetry import Outbox, TelemetrySender
    from telemetry_hub.cli import fleet_table
    from telemetry_hub.server import fleet_status

    store = (HubStore(f"sqlite:///{tmp_path / 'hub.sqlite'}") if backend == "sqlite"
             else request.getfixturevalue("own_schema_store"))
    day = 86_400_000
    outbox = Outbox(tmp_path / "outbox.sqlite", "jetson-skewed")

    def stats_event(age_ms: int) -> None:
        outbox.add("stats", {"state": "serving", "note": "payload-marker"})
        with outbox._lock:  # the device clock was far off when it stamped this one
            outbox._db.execute("UPDATE outbox SET ts_ms = ts_ms - ? WHERE rowid = (SELECT MAX(rowid) FROM outbox)",
                               (age_ms,))

    async def scenario():
        settings = HubSettings(database_url="sqlite://", port=0, tokens="jetson-skewed:tok", read_tokens="reader")
        server, port, _ = await start_hub(settings, store)
        sender = TelemetrySender(outbox, f"127.0.0.1:{port}", "tok")
        try:
            stats_event(20 * day)
            stats_event(0)
            with caplog.at_level(logging.INFO, logger="edge_runtime.report.telemetry"):
                assert await sender.flush() == 2
                first = [r.getMessage() for r in caplog.records]
                stats_event(20 * day)
                assert await sender.flush() == 1  # dropped again: no second warning
                stats_event(0)
                assert await sender.flush() == 1  # kept again: said once
            return first, await fleet_status(f"127.0.0.1:{port}", "reader")
        finally:
            await sender.close()
            await server.stop(0)

    first, rows = asyncio.run(scenario())
    outbox.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage() in first
    assert "1 stats events" in warnings[0].getMessage() and "clock" in warnings[0].getMessage()
    assert any("keeps this device's stats events again" in r.getMessage() for r in caplog.records)
    assert not any("payload-marker" in r.getMessage() for r in caplog.records)
    (row,) = rows
    assert (row.stats_out_of_window, row.clock_skew_known) == (2, True)
    assert abs(row.clock_skew_ms) < day  # its last call was stamped now
    console = Console(width=400, record=True)
    console.print(fleet_table(rows))
    text_out = console.export_text()
    assert "clock skew" in text_out and "stats dropped" in text_out
