"""Event and device-state storage through SQLAlchemy: ``sqlite:///hub.sqlite`` by default, or a PostgreSQL URL
(``postgresql+psycopg://user:pass@host/db``).

The schema is Alembic's (``telemetry_hub/migrations``): the hub upgrades the database at start, one replica at a
time (a PostgreSQL advisory lock), and stamps a database an older hub created before it migrates it. State changes
(every event but ``stats``) are kept in ``events``; ``stats`` events go to ``stats``, partitioned by day on
PostgreSQL, and :meth:`HubStore.apply_retention` drops the days older than the retention (SQLite: deletes them).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    func,
    inspect,
    select,
    text,
)
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
)
"""One row per device and model it serves (a device serves several models, each with its own life cycle)."""
MODEL_FIELDS = ("target_key", "desired_version", "serving_version", "state", "validation_result", "p50_ms",
                "p99_ms", "batching_json", "variant_json")


@dataclass(frozen=True)
class IncomingEvent:
    """One event as received."""

    id: str
    kind: str
    timestamp_ms: int
    payload_json: str


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
        changes["variant_json"] = json.dumps({k: payload.get(k) for k in ("chosen", "mode", "reason", "figures")})
    elif kind == "stats":
        for field in ("desired_version", "serving_version", "state", "target_key"):
            if payload.get(field):
                changes[field] = payload[field]
        for field in ("p50_ms", "p99_ms"):
            if payload.get(field) is not None:
                changes[field] = float(payload[field])
    return changes


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


def _partition_name(day: int) -> str:
    """``stats_dYYYYMMDD`` for the day ``day`` (days since the epoch): names sort as the days do."""
    return "stats_d" + time.strftime("%Y%m%d", time.gmtime(day * 86_400))


class HubStore:
    """The hub's database: migrated to the current schema when opened (see the module docstring)."""

    def __init__(self, url: str, *, stats_retention_days: int = 14) -> None:
        _private_sqlite_file(url)
        self.stats_retention_days = stats_retention_days
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
        with self.engine.begin() as conn:
            if not self.postgresql:
                done["deleted"] = conn.execute(stats.delete().where(stats.c.ts_ms < cutoff_ms)).rowcount or 0
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
                    conn.execute(text(f"DROP TABLE {name}"))
                    done["dropped"] += 1
        return done

    def stats_window(self, now_ms: int) -> tuple[int, int]:
        """The timestamps a ``stats`` event is kept for: within the retention, and not past the days made ahead."""
        return (now_ms // DAY_MS - self.stats_retention_days) * DAY_MS, (now_ms // DAY_MS + DAYS_AHEAD + 1) * DAY_MS

    def ingest(self, device_id: str, batch: Iterable[IncomingEvent]) -> tuple[list[str], int]:
        """Store events not seen before (by device and id) and update the device's rows; returns ``(acknowledged ids,
        duplicates)``. Every id in ``batch`` is acknowledged: new ones are stored, old ones were already."""
        return self.ingest_many([(device_id, list(batch))])[0]

    def ingest_many(self, calls: list[tuple[str, list[IncomingEvent]]]) -> list[tuple[list[str], int]]:
        """:meth:`ingest` for several devices' calls in one transaction (the hub groups the calls that arrive
        together): one multi-row insert per table, one multi-row upsert per kind of row change, rows in key order
        (so replicas writing the same devices cannot deadlock). Returns each call's ``(acknowledged ids,
        duplicates)``."""
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
            results: list[tuple[list[str], int]] = []
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
                        row.update(update)
                        row["last_seen_ms"] = max(row.get("last_seen_ms", 0), event.timestamp_ms)
                if batch:
                    changes["last_seen_ms"] = max(changes.get("last_seen_ms", 0),
                                                  max(e.timestamp_ms for e in batch))
                if stamps := [e.timestamp_ms for e in batch if _well_formed(e)]:
                    changes["clock_skew_ms"] = max(stamps) - now
                if out:  # added to the device's count (see _upsert_rows)
                    changes["stats_out_of_window"] = changes.get("stats_out_of_window", 0) + out
                results.append(([e.id for e in batch], len(stored) - len(fresh)))
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
                statement = upsert.on_conflict_do_update(index_elements=key, set_=updates)
            # RETURNING makes SQLAlchemy send the rows as one multi-row statement (its "insertmanyvalues"), not as
            # one statement per row
            conn.execute(statement.returning(table.c[key[0]]), members).all()

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
              model_name: str = "", version: str = "", stale_since_ms: int = 0) -> list[dict[str, Any]]:
        """One row per device and model (latest state), by device id then model name (a device with no model
        first, as model ``""``): those after ``after`` (``(device id, model name)``), at most ``limit``,
        optionally filtered. See :meth:`fleet_query`."""
        query = self.fleet_query(limit=limit, after=after, state=state, model_name=model_name, version=version,
                                 stale_since_ms=stale_since_ms)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

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
