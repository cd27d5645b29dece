"""Event and device-state storage through SQLAlchemy: ``sqlite:///hub.sqlite`` by default, or a PostgreSQL URL
(``postgresql+psycopg://user:pass@host/db``).

The schema is Alembic's (``telemetry_hub/migrations``): the hub upgrades the database at start, one replica at a
time (a PostgreSQL advisory lock), and stamps a database an older hub created before it migrates it. State changes
(every event but ``stats``) are kept in ``events``; ``stats`` events go to ``stats``, partitioned by day on
PostgreSQL. Raw stats are kept for a short window (``raw_retention_hours``, 1 h by default): the hub's background
loop rolls them up per device and model into 5-minute and hourly buckets (:meth:`HubStore.roll_up`, which then
deletes the raw rows past the window), and :meth:`HubStore.apply_retention` keeps each tier for its own retention
(PostgreSQL: whole raw day partitions dropped once rolled up). Readers of stats history use
:meth:`HubStore.stats_series`, which reads the finest tier still kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    case,
    create_engine,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql import Select

from edgeloop_core.errors import ConfigError, StoreUnavailable

log = logging.getLogger(__name__)
metadata = MetaData()
events = Table(
    "events", metadata,
    Column("id", String(64), primary_key=True),
    Column("device_id", String(128), primary_key=True, index=True),
    Column("kind", String(32), nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("payload", Text, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
)
stats = Table(
    "stats", metadata,
    Column("id", String(64), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("ts_ms", BigInteger, primary_key=True),
    Column("payload", Text, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
)
"""Periodic ``stats`` events, by day (PostgreSQL: one partition per day, ``stats_dYYYYMMDD``). Events and stats are
keyed by device and id (migration 0004): an id is unique per device only (two devices cloned from one image share
their outbox's ids)."""
DAY_MS = 86_400_000
DAYS_AHEAD = 7
"""Partitions made ahead of today; stats stamped further ahead (a device clock far off) are acknowledged, not kept."""
MIGRATION_LOCK = 727_170
devices = Table(
    "devices", metadata,
    Column("device_id", String(128), primary_key=True),
    Column("last_seen_ms", BigInteger, default=0),
    Column("facts_json", Text, default="{}"),
    Column("stats_out_of_window", BigInteger, default=0, server_default="0", nullable=False),
    Column("clock_skew_ms", BigInteger, nullable=True),
)
"""One row per device. ``stats_out_of_window``: the stats events acknowledged but not kept (stamped outside
:meth:`HubStore.stats_window`); ``clock_skew_ms``: the device's newest event stamp in its last call minus the hub's
clock when it arrived (ms; far below zero: a clock behind, or a backlog sent late; above zero: a clock ahead)."""
device_models = Table(
    "device_models", metadata,
    Column("device_id", String(128), primary_key=True),
    Column("model_name", String(128), primary_key=True),
    Column("target_key", String(128), default=""),
    Column("desired_version", String(128), default=""),
    Column("serving_version", String(128), default=""),
    Column("state", String(32), default=""),
    Column("validation_result", Text, default=""),
    Column("p50_ms", Float, nullable=True),
    Column("p99_ms", Float, nullable=True),
    Column("last_seen_ms", BigInteger, default=0),
    Column("batching_json", Text, default=""),
    Column("variant_json", Text, default=""),
    Column("drift_json", Text, nullable=True),
    Column("serving_since_ms", BigInteger, nullable=True),
    Column("feedback_version", String(128), nullable=True),
    Column("feedback_labels", BigInteger, default=0, server_default="0", nullable=False),
    Column("feedback_known", BigInteger, default=0, server_default="0", nullable=False),
    Column("feedback_correct", BigInteger, default=0, server_default="0", nullable=False),
)
"""One row per device and model it serves (a device serves several models, each with its own life cycle).
``serving_since_ms``: when ``serving_version`` last changed (the device's stamp of the event that changed it);
``feedback_*``: the labels apps sent for ``feedback_version``'s answers (received for requests the device still
remembered, those naming a class it could compare, those where its top-1 was right), summed over the device's stats
events and started anew when the version changes (migration 0008)."""
FEEDBACK_COUNTS = ("feedback_labels", "feedback_known", "feedback_correct")


def _rollup_table(name: str) -> Table:
    return Table(
        name, metadata,
        Column("device_id", String(128), primary_key=True),
        Column("model_name", String(128), primary_key=True),
        Column("bucket_ms", BigInteger, primary_key=True),
        Column("samples", Integer, nullable=False),
        Column("requests", BigInteger, nullable=False),
        Column("p50_ms_sum", Float, nullable=False),
        Column("p50_count", Integer, nullable=False),
        Column("p99_ms_max", Float, nullable=True),
        Column("last_ts_ms", BigInteger, nullable=False),
        Column("state", String(32), nullable=False),
        Column("serving_version", String(128), nullable=False),
    )


ROLLUP_PERIODS_MS = {"stats_5m": 300_000, "stats_1h": 3_600_000}
rollups = {name: _rollup_table(name) for name in ROLLUP_PERIODS_MS}
"""Stats per device and model per bucket (5 minutes, one hour; ``bucket_ms``: the bucket's start): stats events
(``samples``), requests served (summed), the mean of their p50s (``p50_ms_sum / p50_count``), the worst p99, and
the state and serving version of the bucket's latest event (``last_ts_ms``). Rows only add up, so a late or
re-rolled event merges into its bucket (see :meth:`HubStore.roll_up`)."""
rollup_state = Table(
    "rollup_state", metadata,
    Column("name", String(32), primary_key=True),
    Column("watermark_ms", BigInteger, nullable=False),
)
"""How far the rollup got: every raw stats row that arrived (``received_ms``) at or before the watermark is in the
rollups."""
ROLLUP_LAG_MS = 120_000
"""A rollup pass takes what arrived up to this long ago, no later: an ingest transaction stamps its rows when it
starts and may commit a little later (or on another replica whose clock is a little off)."""
ROLLUP_SLICE_MS = 300_000
"""Arrival time rolled up per transaction (a backlog goes in slices, each committed with its watermark)."""
_PG_INPUT = """
doc AS (SELECT device_id, ts_ms, edgeloop_try_jsonb(payload) AS j FROM stats
        WHERE received_ms > :low AND received_ms <= :high),
input AS MATERIALIZED (
  SELECT d.device_id, d.ts_ms, left(coalesce(m->>'model_name', ''), 128) AS model_name,
         CASE WHEN jsonb_typeof(m->'requests') = 'number' AND (m->>'requests')::numeric > 0
              THEN floor((m->>'requests')::numeric)::bigint ELSE 0 END AS requests,
         CASE WHEN jsonb_typeof(m->'p50_ms') = 'number' THEN (m->>'p50_ms')::float8 END AS p50,
         CASE WHEN jsonb_typeof(m->'p99_ms') = 'number' THEN (m->>'p99_ms')::float8 END AS p99,
         left(coalesce(m->>'state', ''), 32) AS state,
         left(coalesce(nullif(m->>'serving_version', ''), m->>'version', ''), 128) AS version
  FROM doc d CROSS JOIN LATERAL jsonb_array_elements(CASE
      WHEN jsonb_typeof(d.j->'models') = 'array' AND jsonb_array_length(d.j->'models') > 0 THEN d.j->'models'
      WHEN jsonb_typeof(d.j) = 'object' THEN jsonb_build_array(d.j)
      ELSE '[{}]'::jsonb END) AS m
  WHERE jsonb_typeof(m) = 'object')"""


def _pg_tier(name: str) -> str:
    period = ROLLUP_PERIODS_MS[name]
    return f"""INSERT INTO {name} AS t (device_id, model_name, bucket_ms, samples, requests, p50_ms_sum, p50_count,
                                  p99_ms_max, last_ts_ms, state, serving_version)
  SELECT device_id, model_name, ts_ms / {period} * {period}, count(*), sum(requests), coalesce(sum(p50), 0),
         count(p50), max(p99), max(ts_ms), (array_agg(state ORDER BY ts_ms DESC))[1],
         (array_agg(version ORDER BY ts_ms DESC))[1]
  FROM input GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
  ON CONFLICT (device_id, model_name, bucket_ms) DO UPDATE SET
    samples = t.samples + excluded.samples, requests = t.requests + excluded.requests,
    p50_ms_sum = t.p50_ms_sum + excluded.p50_ms_sum, p50_count = t.p50_count + excluded.p50_count,
    p99_ms_max = greatest(t.p99_ms_max, excluded.p99_ms_max), last_ts_ms = greatest(t.last_ts_ms, excluded.last_ts_ms),
    state = CASE WHEN excluded.last_ts_ms >= t.last_ts_ms THEN excluded.state ELSE t.state END,
    serving_version = CASE WHEN excluded.last_ts_ms >= t.last_ts_ms THEN excluded.serving_version
                           ELSE t.serving_version END
  RETURNING 1"""


PG_ROLLUP = (f"WITH {_PG_INPUT}, fine AS ({_pg_tier('stats_5m')}), hourly AS ({_pg_tier('stats_1h')}) "
             "SELECT count(*) FROM doc")
"""One slice of the rollup on PostgreSQL, in one statement: the raw rows that arrived in ``(:low, :high]`` read as
JSON in the database (a payload that does not parse is a sample of model ``""``), added to both tiers; returns the
raw rows read."""
TEXT_LIMITS = {"target_key": 128, "desired_version": 128, "serving_version": 128, "state": 32}
"""The model row's string columns and their lengths: what a device sends is cut to fit (PostgreSQL refuses longer)."""
MODEL_FIELDS = ("target_key", "desired_version", "serving_version", "state", "validation_result", "p50_ms",
                "p99_ms", "batching_json", "variant_json", "drift_json", "serving_since_ms", "feedback_version",
                *FEEDBACK_COUNTS)


@dataclass(frozen=True)
class IncomingEvent:
    """One event as received."""

    id: str
    kind: str
    timestamp_ms: int
    payload_json: str


class Ingested(NamedTuple):
    """What one Report call's events came to."""

    ids: list[str]
    """Every id of the call: stored now or before (the device may drop them from its outbox)."""
    duplicates: int
    """Ids already stored (resends)."""
    out_of_window: int = 0
    """Stats events acknowledged but not kept: stamped outside :meth:`HubStore.stats_window`."""
    clock_skew_ms: int | None = None
    """The call's newest event stamp minus the hub's clock when it arrived (ms); ``None``: no usable stamp."""


def _private_sqlite_file(url: str) -> None:
    """Create a SQLite database file readable by its owner only (events name devices, versions and errors)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - create_engine reports a bad URL with its own words
        return
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return
    path = Path(parsed.database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create the hub database {path}: {exc.strerror}") from exc


def _well_formed(event: IncomingEvent) -> bool:
    return (0 < len(event.id) <= 64 and 0 < len(event.kind) <= 32 and isinstance(event.timestamp_ms, int)
            and 0 <= event.timestamp_ms < 2**62)


def _validation_line(result: dict[str, Any]) -> str:
    """``passed top1_accuracy 0.9944 (ref 0.9944 ± 0.0100) int8-ort``: the verdict first, the variant last."""
    verdict = "passed" if result.get("passed") else "failed"
    line = (f"{verdict} {result.get('metric', '')} {result.get('value', 0):.4f} "
            f"(ref {result.get('reference', 0):.4f} ± {result.get('tolerance', 0):.4f})")
    return f"{line} {result['variant']}" if result.get("variant") else line


def _model_changes(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """How an event of ``kind`` about one model changes that model's row."""
    changes: dict[str, Any] = {}
    if kind == "serving":
        changes.update(serving_version=payload.get("version", ""), state="serving",
                       target_key=payload.get("target_key", ""))
        if isinstance(payload.get("validation"), dict):  # the served variant's (several may have been validated)
            changes["validation_result"] = _validation_line(payload["validation"])
    elif kind == "built":
        changes["target_key"] = payload.get("target_key", "")
    elif kind == "validated":
        changes["validation_result"] = _validation_line(payload)
        changes["desired_version"] = payload.get("version", "")
    elif kind == "failed":
        changes.update(state="failed", desired_version=payload.get("version", ""))
    elif kind == "unloaded":
        changes.update(state="unloaded", serving_version="")
    elif kind == "batch_sweep":
        changes["batching_json"] = json.dumps({"chosen": payload.get("chosen"), "points": payload.get("points")})
    elif kind == "variant_choice":
        changes["variant_json"] = json.dumps({k: payload.get(k) for k in ("chosen", "mode", "reason", "objective",
                                                                          "mj_per_inference", "figures")})
    elif kind == "stats":
        for field in ("desired_version", "serving_version", "state", "target_key"):
            if payload.get(field):
                changes[field] = payload[field]
        for field in ("p50_ms", "p99_ms"):
            if payload.get(field) is not None:
                changes[field] = float(payload[field])
        drift = field_drift(payload.get("field"))
        if drift is not None:
            changes["drift_json"] = json.dumps(drift)
        changes.update(field_feedback(payload.get("field"), payload.get("serving_version")))
    for field, limit in TEXT_LIMITS.items():  # a device's odd value (a list, a long string) must not fail the write
        if field in changes:
            changes[field] = _text(changes[field])[:limit]
    return changes


def field_drift(field: Any) -> dict[str, Any] | None:  # noqa: ANN401 - a JSON value from a device
    """The drift of a stats event's ``field`` statistics (the device's counts in its model's baseline bins, and the
    baseline's proportions, :mod:`edgeloop_core.drift`): ``{"max", "feature", "features", "samples"}``, the
    Jensen-Shannon distance per feature and the largest; ``None`` when there are none, or they do not make sense (a
    device's odd payload is ignored, never an error)."""
    from edgeloop_core.contract.field import FeatureBaseline, FieldBaseline
    from edgeloop_core.drift import divergence

    if not isinstance(field, dict) or not isinstance(field.get("counts"), dict) \
            or not isinstance(field.get("baseline"), dict):
        return None
    try:
        features = {name: FeatureBaseline(proportions=[float(p) for p in shares])
                    for name, shares in field["baseline"].items() if isinstance(shares, list) and shares}
        counts = {name: [int(c) for c in values] for name, values in field["counts"].items()
                  if isinstance(values, list) and all(isinstance(c, int) and c >= 0 for c in values)}
        samples = int(field.get("samples") or 0)
        per_feature = divergence(FieldBaseline(samples=1, features=features), counts) if features else {}
    except (TypeError, ValueError):
        return None
    per_feature = {name: round(value, 4) for name, value in per_feature.items() if math.isfinite(value)}
    if not per_feature:
        return None
    worst = max(per_feature, key=per_feature.__getitem__)
    drift = {"max": per_feature[worst], "feature": worst, "features": per_feature, "samples": samples}
    if isinstance(field.get("version"), str) and field["version"]:  # the version the counts are of
        drift["version"] = field["version"][:128]
    return drift


def field_feedback(field: Any, serving_version: Any) -> dict[str, Any]:  # noqa: ANN401 - JSON values from a device
    """The model row's feedback changes from a stats event's ``field.feedback`` (``{version: {"labels", "known",
    "correct"}}``, the counts since the device's previous stats event): those of ``serving_version`` only (what
    promotion compares), as ``feedback_version`` and the three counts; empty when there are none or they do not make
    sense (0 ≤ correct ≤ known ≤ labels), never an error."""
    if not isinstance(field, dict) or not isinstance(field.get("feedback"), dict) \
            or not isinstance(serving_version, str) or not serving_version:
        return {}
    counts = field["feedback"].get(serving_version)
    if not isinstance(counts, dict):
        return {}
    values = [counts.get(k) for k in ("labels", "known", "correct")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in values) \
            or not values[0] >= values[1] >= values[2]:
        return {}
    return {"feedback_version": serving_version[:128], **dict(zip(FEEDBACK_COUNTS, values, strict=True))}


def _merge_model_changes(row: dict[str, Any], update: dict[str, Any], stamp_ms: int) -> None:
    """Merge one event's ``update`` of a model row into the ``row`` changes of this transaction: a changed serving
    version is stamped ``serving_since_ms`` (kept while it stays the same); feedback counts of the same version add
    up (another version's replace them)."""
    if "serving_version" in update and (row.get("serving_version") != update["serving_version"]
                                        or "serving_since_ms" not in row):
        row["serving_since_ms"] = stamp_ms
    if "feedback_version" in update and row.get("feedback_version") == update["feedback_version"]:
        update = {**update, **{k: row[k] + update[k] for k in FEEDBACK_COUNTS}}
    row.update(update)


def _changes(kind: str, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """How an event changes the device's row and its models' rows: ``(device changes, model name → changes)``.
    A stats event carries every model (``models``); other model events name theirs (``model_name``)."""
    device: dict[str, Any] = {}
    models: dict[str, dict[str, Any]] = {}
    if kind == "facts":
        device["facts_json"] = json.dumps(payload.get("facts", {}))
    if kind == "stats" and isinstance(payload.get("models"), list):
        for status in payload["models"]:
            if isinstance(status, dict) and status.get("model_name"):
                models[str(status["model_name"])] = _model_changes("stats", status)
    elif payload.get("model_name"):
        models[str(payload["model_name"])] = _model_changes(kind, payload)
    return device, models


def _number(value: Any) -> float | None:  # noqa: ANN401 - a JSON value
    """A JSON number as a float; anything else (a string, a boolean, null) is no number."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _stats_figures(payload_json: str) -> list[tuple[str, dict[str, Any]]]:
    """``(model name, figures)`` of each model a raw stats event reports (its ``models``, or the one it names; a
    payload that names none: model ``""``): requests, p50/p99 (ms), state and serving version. A payload that does
    not parse still counts as a sample (of model ``""``). The same reading as :data:`PG_ROLLUP`'s."""
    try:
        payload = json.loads(payload_json or "{}")
    except ValueError:
        payload = {}
    payload = payload if isinstance(payload, dict) else {}
    models = payload["models"] if isinstance(payload.get("models"), list) and payload["models"] else [payload]
    figures = []
    for status in models:  # as PG_ROLLUP reads them
        if not isinstance(status, dict):
            continue
        requests = _number(status.get("requests"))
        figures.append((_text(status.get("model_name"))[:128], {
            "requests": int(requests) if requests and requests > 0 else 0,
            "p50_ms": _number(status.get("p50_ms")), "p99_ms": _number(status.get("p99_ms")),
            "state": _text(status.get("state"))[:32],
            "serving_version": (_text(status.get("serving_version")) or _text(status.get("version")))[:128]}))
    return figures


def _text(value: Any) -> str:  # noqa: ANN401 - a JSON value
    """A JSON value as PostgreSQL's ``->>`` gives it: a string as is, null as empty, anything else as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))


def _partition_name(day: int) -> str:
    """``stats_dYYYYMMDD`` for the day ``day`` (days since the epoch): names sort as the days do."""
    return "stats_d" + time.strftime("%Y%m%d", time.gmtime(day * 86_400))


class HubStore:
    """The hub's database: migrated to the current schema when opened (see the module docstring)."""

    def __init__(self, url: str, *, stats_retention_days: int = 14, raw_retention_hours: float = 1.0,
                 hourly_retention_days: int = 90) -> None:
        """``stats_retention_days``: days of 5-minute rollups kept (and how old a stats event may be stamped and
        still be kept); ``raw_retention_hours``: hours raw stats are kept (after both their stamp and their
        arrival); ``hourly_retention_days``: days of hourly rollups kept."""
        _private_sqlite_file(url)
        self.stats_retention_days = stats_retention_days
        self.raw_retention_ms = int(raw_retention_hours * 3_600_000)
        self.hourly_retention_days = max(hourly_retention_days, stats_retention_days)
        try:
            self.engine = create_engine(url)
            self.migrate()
            self.apply_retention()
        except ImportError as exc:
            raise ConfigError(f"no database driver for {url.split(':', 1)[0]}: pip install 'edgeloop[hub]'") from exc
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot open the hub database: {exc.__class__.__name__}") from exc

    @property
    def postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def migrate(self) -> str:
        """Bring the schema to Alembic's head (one replica at a time); returns the revision. A database a hub before
        migrations created is stamped with the revision its tables match first."""
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
        with self.engine.begin() as conn:
            if self.postgresql:  # replicas starting together: the first migrates, the others find it done
                conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            config.attributes["connection"] = conn
            tables = set(inspect(conn).get_table_names())
            if "devices" in tables and "alembic_version" not in tables:  # a hub before migrations made it
                if "events" not in tables:  # the first schema, as far as it got
                    events.create(conn)
                command.stamp(config, "0002" if "device_models" in tables else "0001")
            command.upgrade(config, "head")
            return MigrationContext.configure(conn).get_current_revision() or ""

    def apply_retention(self, now_ms: int | None = None) -> dict[str, int]:
        """Keep ``stats`` for ``stats_retention_days``: PostgreSQL drops whole day partitions past it and makes the
        ones up to :data:`DAYS_AHEAD` days ahead; SQLite deletes the rows. State changes are never removed.
        Safe to run on every replica at once. Returns what it did."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff_ms, end_ms = self.stats_window(now_ms)  # the days ingest keeps are the days that have partitions
        first_day = cutoff_ms // DAY_MS
        done = {"created": 0, "dropped": 0, "deleted": 0}
        hourly_cutoff_ms = (now_ms // DAY_MS - self.hourly_retention_days) * DAY_MS
        with self.engine.begin() as conn:
            for name, cutoff in (("stats_5m", cutoff_ms), ("stats_1h", hourly_cutoff_ms)):
                table = rollups[name]
                done[name] = conn.execute(table.delete().where(table.c.bucket_ms < cutoff)).rowcount or 0
            watermark = conn.execute(select(rollup_state.c.watermark_ms)
                                     .where(rollup_state.c.name == "stats")).scalar() or 0
            if not self.postgresql:  # only what the rollups hold already
                done["deleted"] = conn.execute(stats.delete().where(
                    stats.c.ts_ms < cutoff_ms, stats.c.received_ms <= watermark)).rowcount or 0
                return done
            conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK + 1})"))
            existing = set(conn.execute(text(
                # 'stats'::regclass is the stats table this connection's search_path finds: a table of that name in
                # another schema (another hub on the same database) is not ours to extend or drop from
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'stats'::regclass")).scalars())
            for day in range(first_day, end_ms // DAY_MS):
                name = _partition_name(day)
                if name not in existing:
                    conn.execute(text(f"CREATE TABLE {name} PARTITION OF stats FOR VALUES FROM ({day * DAY_MS}) "
                                      f"TO ({(day + 1) * DAY_MS})"))
                    done["created"] += 1
            for name in existing:
                if name.startswith("stats_d") and name < _partition_name(first_day):
                    if conn.execute(text(f"SELECT 1 FROM {name} WHERE received_ms > :w LIMIT 1"),
                                    {"w": watermark}).first():
                        continue  # not rolled up yet: the next round drops it
                    conn.execute(text(f"DROP TABLE {name}"))
                    done["dropped"] += 1
        return done

    def roll_up(self, now_ms: int | None = None) -> dict[str, int]:
        """Add the raw stats that arrived since the last pass (up to :data:`ROLLUP_LAG_MS` ago) to the 5-minute and
        hourly rollups, then delete the raw rows past the raw window that the rollups hold. A backlog goes in
        slices of :data:`ROLLUP_SLICE_MS` of arrival time, each in one transaction with the watermark it moves, so a
        pass cut short leaves every slice added exactly once. Replicas may run it together: the watermark row is
        locked while a slice is added (a second replica waits, then finds the slice done). Returns
        ``{"rows": raw rows rolled up, "slices": transactions, "trimmed": raw rows deleted}``."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        upper = now_ms - ROLLUP_LAG_MS
        done = {"rows": 0, "slices": 0, "trimmed": 0}
        while True:
            with self.engine.begin() as conn:
                conn.execute(self._insert()(rollup_state).values(name="stats", watermark_ms=0)
                             .on_conflict_do_nothing(index_elements=["name"]))
                watermark = conn.execute(select(rollup_state.c.watermark_ms).where(rollup_state.c.name == "stats")
                                         .with_for_update()).scalar_one()
                following = conn.execute(select(func.min(stats.c.received_ms))
                                         .where(stats.c.received_ms > watermark)).scalar()
                if following is None or following > upper:  # nothing more has arrived in time
                    if watermark < upper:
                        conn.execute(update(rollup_state).where(rollup_state.c.name == "stats")
                                     .values(watermark_ms=upper))
                    break
                end = min(upper, following + ROLLUP_SLICE_MS)
                if self.postgresql:  # in the database: no payload crosses into Python (or holds its GIL)
                    done["rows"] += conn.execute(text(PG_ROLLUP), {"low": watermark, "high": end}).scalar_one()
                else:
                    rows = conn.execute(select(stats.c.device_id, stats.c.ts_ms, stats.c.payload)
                                        .where(stats.c.received_ms > watermark, stats.c.received_ms <= end)).all()
                    self._add_to_rollups(conn, rows)
                    done["rows"] += len(rows)
                conn.execute(update(rollup_state).where(rollup_state.c.name == "stats").values(watermark_ms=end))
                done["slices"] += 1
        cutoff = now_ms - self.raw_retention_ms
        with self.engine.begin() as conn:  # kept a raw window after stamp and arrival: resends still meet them
            done["trimmed"] = conn.execute(stats.delete().where(
                stats.c.ts_ms < cutoff, stats.c.received_ms < min(cutoff, upper + 1))).rowcount or 0
        return done

    def _add_to_rollups(self, conn: Any, rows: Iterable[Any]) -> None:  # noqa: ANN401 - a SQLAlchemy connection
        """Aggregate raw ``(device_id, ts_ms, payload)`` rows per tier, device, model and bucket, and add them to
        the rollup rows (additive upserts, in key order so replicas cannot deadlock)."""
        sums: dict[str, dict[tuple[str, str, int], dict[str, Any]]] = {name: {} for name in ROLLUP_PERIODS_MS}
        for device_id, ts_ms, payload in rows:
            for model, figures in _stats_figures(payload):
                for name, period in ROLLUP_PERIODS_MS.items():
                    row = sums[name].setdefault((device_id, model, ts_ms // period * period), {
                        "samples": 0, "requests": 0, "p50_ms_sum": 0.0, "p50_count": 0, "p99_ms_max": None,
                        "last_ts_ms": -1, "state": "", "serving_version": ""})
                    row["samples"] += 1
                    row["requests"] += figures["requests"]
                    if figures["p50_ms"] is not None:
                        row["p50_ms_sum"] += figures["p50_ms"]
                        row["p50_count"] += 1
                    if figures["p99_ms"] is not None:
                        row["p99_ms_max"] = max(row["p99_ms_max"] or 0.0, figures["p99_ms"])
                    if ts_ms >= row["last_ts_ms"]:
                        row.update(last_ts_ms=ts_ms, state=figures["state"],
                                   serving_version=figures["serving_version"])
        for name, buckets in sums.items():
            if not buckets:
                continue
            table = rollups[name]
            upsert = self._insert()(table)
            old, new = table.c, upsert.excluded
            newer = new.last_ts_ms >= old.last_ts_ms
            statement = upsert.on_conflict_do_update(index_elements=["device_id", "model_name", "bucket_ms"], set_={
                "samples": old.samples + new.samples, "requests": old.requests + new.requests,
                "p50_ms_sum": old.p50_ms_sum + new.p50_ms_sum, "p50_count": old.p50_count + new.p50_count,
                "p99_ms_max": self._greatest(func.coalesce(old.p99_ms_max, new.p99_ms_max),
                                             func.coalesce(new.p99_ms_max, old.p99_ms_max)),
                "last_ts_ms": self._greatest(old.last_ts_ms, new.last_ts_ms),
                "state": case((newer, new.state), else_=old.state),
                "serving_version": case((newer, new.serving_version), else_=old.serving_version)})
            conn.execute(statement, [{"device_id": d, "model_name": m, "bucket_ms": b, **row}
                                     for (d, m, b), row in sorted(buckets.items())])

    def stats_series(self, device_id: str, model_name: str, since_ms: int, until_ms: int,
                     now_ms: int | None = None) -> list[dict[str, Any]]:
        """A device's model's stats from ``since_ms`` to ``until_ms``, bucket by bucket, from the finest tier still
        kept: 5-minute buckets within the 5-minute retention, hourly ones before it (raw stats reach the rollups
        within a few minutes). Each: ``bucket_ms``, ``period_ms``, ``samples``, ``requests``, ``p50_ms`` (mean),
        ``p99_ms`` (worst), ``state``, ``serving_version``."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        fine_from = self.stats_window(now_ms)[0]
        series: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            for name, low, high in (("stats_1h", since_ms, min(until_ms, fine_from)),
                                    ("stats_5m", max(since_ms, fine_from), until_ms)):
                table = rollups[name]
                query = (select(table).where(table.c.device_id == device_id, table.c.model_name == model_name,
                                             table.c.bucket_ms >= low, table.c.bucket_ms < high)
                         .order_by(table.c.bucket_ms))
                for r in conn.execute(query):
                    series.append({"bucket_ms": r.bucket_ms, "period_ms": ROLLUP_PERIODS_MS[name],
                                   "samples": r.samples, "requests": r.requests,
                                   "p50_ms": r.p50_ms_sum / r.p50_count if r.p50_count else None,
                                   "p99_ms": r.p99_ms_max, "state": r.state, "serving_version": r.serving_version})
        return series

    def stats_window(self, now_ms: int) -> tuple[int, int]:
        """The timestamps a ``stats`` event is kept for: within the retention, and not past the days made ahead."""
        return (now_ms // DAY_MS - self.stats_retention_days) * DAY_MS, (now_ms // DAY_MS + DAYS_AHEAD + 1) * DAY_MS

    def ingest(self, device_id: str, batch: Iterable[IncomingEvent]) -> Ingested:
        """Store events not seen before (by device and id) and update the device's rows; returns the acknowledged
        ids, the duplicates and the stats not kept. Every id in ``batch`` is acknowledged: new ones are stored, old
        ones were already, out-of-window stats are dropped (and counted)."""
        return self.ingest_many([(device_id, list(batch))])[0]

    def ingest_many(self, calls: list[tuple[str, list[IncomingEvent]]]) -> list[Ingested]:
        """:meth:`ingest` for several devices' calls in one transaction (the hub groups the calls that arrive
        together): one multi-row insert per table, one multi-row upsert per kind of row change, rows in key order
        (so replicas writing the same devices cannot deadlock). Returns each call's :class:`Ingested`."""
        now = int(time.time() * 1000)
        low, high = self.stats_window(now)
        kept: list[list[IncomingEvent]] = []
        dropped: list[int] = []  # per call: stats out of the window
        for device_id, batch in calls:
            # a malformed event is acknowledged but not stored: refusing the batch would leave it in the device's
            # outbox forever, and every event behind it too
            good = [e for e in batch if _well_formed(e)]
            if len(good) < len(batch):
                log.warning("device %s sent %d malformed events; acknowledged, not stored", device_id,
                            len(batch) - len(good))
            stored = [e for e in good if e.kind != "stats" or low <= e.timestamp_ms < high]
            if len(stored) < len(good):
                log.info("device %s sent %d stats events outside the retention window; acknowledged, not kept",
                         device_id, len(good) - len(stored))
            kept.append(stored)
            dropped.append(len(good) - len(stored))
        insert_ = self._insert()
        with self.engine.begin() as conn:
            inserted: set[tuple[str, str]] = set()
            # idempotent by (device, event id), race-free across replicas: a resend or a racing twin inserts nothing
            changes_only = [{"id": e.id, "device_id": d, "kind": e.kind, "ts_ms": e.timestamp_ms,
                             "payload": e.payload_json, "received_ms": now}
                            for (d, _), batch in zip(calls, kept, strict=True) for e in batch if e.kind != "stats"]
            periodic = [{"id": e.id, "device_id": d, "ts_ms": e.timestamp_ms, "payload": e.payload_json,
                         "received_ms": now}
                        for (d, _), batch in zip(calls, kept, strict=True) for e in batch if e.kind == "stats"]
            # rows as executemany parameters, not .values(rows): SQLAlchemy then renders the multi-row INSERT from
            # one cached compiled statement (its "insertmanyvalues") instead of compiling one per group size
            if changes_only:
                statement = insert_(events).on_conflict_do_nothing(index_elements=["device_id", "id"])
                inserted |= {(d, i) for d, i in conn.execute(
                    statement.returning(events.c.device_id, events.c.id), changes_only)}
            if periodic:  # a resend carries its original's timestamp, so it meets it in the same day
                statement = insert_(stats).on_conflict_do_nothing(index_elements=["device_id", "id", "ts_ms"])
                inserted |= {(d, i) for d, i in conn.execute(
                    statement.returning(stats.c.device_id, stats.c.id), periodic)}
            device_rows: dict[str, dict[str, Any]] = {}
            model_rows: dict[tuple[str, str], dict[str, Any]] = {}
            results: list[Ingested] = []
            claimed: set[tuple[str, str]] = set()
            for (device_id, batch), stored, out in zip(calls, kept, dropped, strict=True):
                fresh = [e for e in stored if (device_id, e.id) in inserted and (device_id, e.id) not in claimed]
                claimed |= {(device_id, e.id) for e in fresh}  # an id two calls of a device carried: new for the first
                changes = device_rows.setdefault(device_id, {})
                for event in sorted(fresh, key=lambda e: e.timestamp_ms):
                    try:
                        payload = json.loads(event.payload_json or "{}")
                        device, models = _changes(event.kind, payload if isinstance(payload, dict) else {})
                    except (ValueError, TypeError, KeyError, AttributeError):  # stored, but it changes no state
                        log.warning("event %s of %s has a payload the fleet view cannot use", event.id, device_id)
                        continue
                    changes.update(device)
                    for model, update in models.items():
                        row = model_rows.setdefault((device_id, model[:128]), {})
                        _merge_model_changes(row, update, event.timestamp_ms)
                        row["last_seen_ms"] = max(row.get("last_seen_ms", 0), event.timestamp_ms)
                if batch:
                    changes["last_seen_ms"] = max(changes.get("last_seen_ms", 0),
                                                  max(e.timestamp_ms for e in batch))
                skew = None
                if stamps := [e.timestamp_ms for e in batch if _well_formed(e)]:
                    skew = changes["clock_skew_ms"] = max(stamps) - now
                if out:  # added to the device's count (see _upsert_rows)
                    changes["stats_out_of_window"] = changes.get("stats_out_of_window", 0) + out
                results.append(Ingested([e.id for e in batch], len(stored) - len(fresh), out, skew))
            # one statement per set of changed columns, so a device's first two calls on two replicas cannot collide
            self._upsert_rows(conn, devices, ["device_id"],
                              [{"device_id": d, **c} for d, c in sorted(device_rows.items())])
            self._upsert_rows(conn, device_models, ["device_id", "model_name"],
                              [{"device_id": d, "model_name": m, **c} for (d, m), c in sorted(model_rows.items())])
        return results

    def _upsert_rows(self, conn: Any, table: Table, key: list[str], rows: list[dict[str, Any]]) -> None:  # noqa: ANN401
        """Upsert ``rows`` (unique on ``key``), grouped by the columns they change: one statement per group."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(sorted(k for k in row if k not in key)), []).append(row)
        for changed, members in groups.items():
            upsert = self._insert()(table)
            if not changed:
                statement = upsert.on_conflict_do_nothing(index_elements=key)
            else:
                updates = {k: upsert.excluded[k] for k in changed}
                if "last_seen_ms" in changed:
                    updates["last_seen_ms"] = self._greatest(table.c.last_seen_ms, upsert.excluded.last_seen_ms)
                if "stats_out_of_window" in changed:  # a count: this call's adds to the stored one
                    updates["stats_out_of_window"] = table.c.stats_out_of_window + upsert.excluded.stats_out_of_window
                updates.update(self._model_updates(table, upsert.excluded, changed))
                statement = upsert.on_conflict_do_update(index_elements=key, set_=updates)
            # RETURNING makes SQLAlchemy send the rows as one multi-row statement (its "insertmanyvalues"), not as
            # one statement per row
            conn.execute(statement.returning(table.c[key[0]]), members).all()

    @staticmethod
    def _model_updates(table: Table, excluded: Any, changed: tuple[str, ...]) -> dict[str, Any]:  # noqa: ANN401
        """A model row's columns that do not simply take the new value: ``serving_since_ms`` stays while the stored
        serving version is the new one; feedback counts of the stored ``feedback_version`` add up."""
        updates: dict[str, Any] = {}
        if table is not device_models:
            return updates
        if "serving_since_ms" in changed:
            same = table.c.serving_version.is_not_distinct_from(excluded.serving_version) \
                & table.c.serving_since_ms.is_not(None)
            updates["serving_since_ms"] = case((same, table.c.serving_since_ms), else_=excluded.serving_since_ms)
        if "feedback_version" in changed:
            same = table.c.feedback_version.is_not_distinct_from(excluded.feedback_version)
            for name in FEEDBACK_COUNTS:
                updates[name] = case((same, table.c[name] + excluded[name]), else_=excluded[name])
        return updates

    def _insert(self):  # noqa: ANN202 - the dialect's insert construct (with ON CONFLICT)
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        elif self.engine.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            raise ConfigError(f"the hub supports SQLite and PostgreSQL, not {self.engine.dialect.name}")
        return dialect_insert

    def _greatest(self, a, b):  # noqa: ANN001, ANN202
        return func.greatest(a, b) if self.engine.dialect.name == "postgresql" else func.max(a, b)

    @staticmethod
    def _rows(after_device: str | None = None) -> Any:  # noqa: ANN401 - a SQLAlchemy join
        """Every device joined with each model it serves (a device that reported no model yet: one row, no model).
        ``after_device`` bounds both sides of the join, so either side is read from its primary key's index from
        that device on (PostgreSQL carries no range from one side of a join to the other)."""
        on = devices.c.device_id == device_models.c.device_id
        if after_device is not None:
            on = on & (device_models.c.device_id >= after_device)
        return devices.outerjoin(device_models, on)

    def fleet(self, *, limit: int | None = None, after: tuple[str, str] | None = None, state: str = "",
              model_name: str = "", version: str = "", stale_since_ms: int = 0) -> list[RowMapping]:
        """One row per device and model (latest state), by device id then model name (a device with no model
        first, as model ``""``): those after ``after`` (``(device id, model name)``), at most ``limit``,
        optionally filtered. See :meth:`fleet_query`."""
        query = self.fleet_query(limit=limit, after=after, state=state, model_name=model_name, version=version,
                                 stale_since_ms=stale_since_ms)
        with self.engine.connect() as conn:  # read-only mappings: half the cost of a dict per row
            return list(conn.execute(query).mappings().all())

    def fleet_query(self, *, limit: int | None = None, after: tuple[str, str] | None = None, state: str = "",
                    model_name: str = "", version: str = "", stale_since_ms: int = 0) -> Select:
        """The query of :meth:`fleet`: keyset pagination on the two primary keys' own columns, so each page is an
        index range scan from ``after`` on, however far into the fleet it is (a key on ``COALESCE(model_name,
        '')`` could use no index: each page read and sorted every row before it)."""
        query = (select(devices.c.device_id, func.coalesce(device_models.c.model_name, "").label("model_name"),
                        devices.c.facts_json, devices.c.stats_out_of_window, devices.c.clock_skew_ms,
                        func.coalesce(device_models.c.last_seen_ms, devices.c.last_seen_ms).label("last_seen_ms"),
                        *(device_models.c[f] for f in MODEL_FIELDS))
                 .select_from(self._rows(after[0] if after is not None else None))
                 .where(*self._filters(state, model_name, version, stale_since_ms)))
        if after is not None:
            device, model = after
            # model names are never empty, so ``> ''`` is every model of the device; a row with no model (NULL)
            # sorts first and is never after a key of its own device
            query = query.where(devices.c.device_id >= device,
                                (devices.c.device_id > device) | (device_models.c.model_name > model))
        query = query.order_by(devices.c.device_id, device_models.c.model_name.asc().nulls_first())
        return query.limit(limit) if limit is not None else query

    def fleet_summary(self, *, state: str = "", model_name: str = "", version: str = "",
                      stale_since_ms: int = 0) -> dict[str, int]:
        """Rows (device and model) per state among those the filters select."""
        query = (select(device_models.c.state, func.count()).select_from(self._rows())
                 .where(*self._filters(state, model_name, version, stale_since_ms))
                 .group_by(device_models.c.state))
        with self.engine.connect() as conn:
            return {(row[0] or "unknown"): int(row[1]) for row in conn.execute(query)}

    @staticmethod
    def _filters(state: str, model_name: str, version: str, stale_since_ms: int) -> list[Any]:
        filters: list[Any] = []
        if state:
            filters.append(device_models.c.state == state)
        if model_name:
            filters.append(device_models.c.model_name == model_name)
        if version:
            filters.append((device_models.c.desired_version == version)
                           | (device_models.c.serving_version == version))
        if stale_since_ms:
            filters.append(devices.c.last_seen_ms < stale_since_ms)
        return filters

    def count_events(self, device_id: str | None = None, kind: str | None = None) -> int:
        """Stored events (optionally of one device and kind), state changes and stats together."""
        total = 0
        with self.engine.connect() as conn:
            for table in (events, stats):
                if kind and (kind == "stats") != (table is stats):
                    continue
                query = select(func.count()).select_from(table)
                if device_id:
                    query = query.where(table.c.device_id == device_id)
                if kind and table is events:
                    query = query.where(events.c.kind == kind)
                total += int(conn.execute(query).scalar_one())
        return total
