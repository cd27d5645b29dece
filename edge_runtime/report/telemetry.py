"""Report step: telemetry events go into an on-disk outbox (SQLite) first, and a sender forwards them to the hub.

At-least-once: an event leaves the outbox only after the hub acknowledged its id; the hub de-duplicates ids, so a
resend after a lost acknowledgement stores nothing twice. While the hub is down the sender backs off (new events
do not wake it early); events written meanwhile (and across restarts) wait in the outbox, which is bounded: above
``max_events`` the oldest ``stats`` events are dropped (and counted), state changes never are. The file is
readable by its owner only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from edge_runtime.aio import wait_event
from edgeloop_core.protos import telemetry_pb2 as pb
from edgeloop_core.protos import telemetry_pb2_grpc
from edgeloop_core.tls import HubTls

log = logging.getLogger(__name__)


DROPPABLE_KINDS = ("stats",)
"""Periodic events the outbox may drop when full (oldest first); every other kind is a state change and stays."""


class Outbox:
    """A SQLite table of events not yet acknowledged by the hub. Safe to use from several threads."""

    def __init__(self, path: Path, device_id: str, *, max_events: int = 10_000) -> None:
        self.device_id = device_id
        self.max_events = max_events
        db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():  # created private: events name the device, its versions and its errors
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(path, 0o600)
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                       "ts_ms INTEGER NOT NULL, payload TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            if db is not None:  # the caller retries: no connection may leak per try
                db.close()
            from edgeloop_core.errors import CacheFull, ConfigError

            if "full" in str(exc).lower() or getattr(exc, "errno", None) == 28:
                raise CacheFull(f"cannot create the telemetry outbox {path}: the disk is full") from exc
            raise ConfigError(f"cannot open the telemetry outbox {path}: {exc}") from exc
        self._db = db
        self._lock = threading.Lock()

    def add(self, kind: str, payload: dict[str, Any]) -> str:
        """Store an event; returns its id. Over ``max_events``, the oldest droppable events make room."""
        event_id = str(uuid.uuid4())
        with self._lock:
            self._db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?)",
                             (event_id, kind, int(time.time() * 1000), json.dumps(payload, default=str)))
            excess = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]) - self.max_events
            if excess > 0:
                marks = ",".join("?" * len(DROPPABLE_KINDS))  # placeholders: no data in the SQL text
                dropped = self._db.execute(
                    f"DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox WHERE kind IN ({marks}) "
                    f"ORDER BY ts_ms, rowid LIMIT ?)", (*DROPPABLE_KINDS, excess)).rowcount
                if dropped:
                    self._db.execute("INSERT INTO counters VALUES ('dropped', ?) ON CONFLICT(name) DO UPDATE SET "
                                     "value = value + excluded.value", (dropped,))
        return event_id

    def dropped(self) -> int:
        """Stats events dropped so far because the outbox was full."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def pending(self, limit: int = 200) -> list[pb.Event]:
        """The oldest unacknowledged events."""
        with self._lock:
            rows = self._db.execute("SELECT id, kind, ts_ms, payload FROM outbox ORDER BY ts_ms, rowid LIMIT ?",
                                    (limit,)).fetchall()
        return [pb.Event(id=r[0], device_id=self.device_id, kind=r[1], timestamp_ms=r[2], payload_json=r[3])
                for r in rows]

    def acknowledge(self, ids: list[str]) -> None:
        """Drop events the hub holds."""
        with self._lock:
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def count(self) -> int:
        """Events waiting."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()



class TelemetrySender:
    """Forwards the outbox to the hub in batches; backs off exponentially (with jitter) while the hub is
    unreachable, and new events do not cut a back-off short."""

    def __init__(self, outbox: Outbox, address: str, token: str | None, *, interval_s: float = 30.0,
                 backoff_max_s: float = 60.0, tls: HubTls | None = None) -> None:
        self.outbox = outbox
        self.address = address
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self.tls = tls
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self.failures = 0
        self.stats_out_of_window = 0
        """Stats events the hub acknowledged but did not keep (stamped outside its window), since start."""
        self._hub_drops_stats = False  # the last answer about stats: dropped (warned once until it changes)

    def wake(self) -> None:
        """Send soon (a new event)."""
        self._wake.set()

    async def flush(self) -> int:
        """Send everything pending; returns how many events the hub acknowledged. Raises grpc.RpcError."""
        if self._channel is None:
            self._channel = (grpc.aio.secure_channel(self.address, self.tls.credentials()) if self.tls
                             else grpc.aio.insecure_channel(self.address))
        stub = telemetry_pb2_grpc.TelemetryHubStub(self._channel)
        sent = 0
        while events := self.outbox.pending():
            reply = await stub.Report(pb.ReportRequest(device_id=self.outbox.device_id, events=events),
                                      metadata=self._metadata, timeout=10)
            self.outbox.acknowledge(list(reply.acknowledged_ids))
            self._note_out_of_window(reply, sum(1 for e in events if e.kind in DROPPABLE_KINDS))
            sent += len(reply.acknowledged_ids)
            if not reply.acknowledged_ids:
                break
        return sent

    def _note_out_of_window(self, reply: pb.ReportResponse, stats_sent: int) -> None:
        """Count the stats the hub did not keep and say so once per change (no event contents in the log): a warning
        when it starts dropping them, a line when it keeps them again."""
        dropped = reply.stats_out_of_window
        self.stats_out_of_window += dropped
        if dropped and not self._hub_drops_stats:
            log.warning("the telemetry hub %s acknowledged %d stats events of this device without keeping them: "
                        "they are stamped outside its window (this call's newest stamp is %+.0f s from the hub's "
                        "clock); check the device clock (NTP)", self.address, dropped, reply.clock_skew_ms / 1000)
        elif stats_sent > dropped == 0 and self._hub_drops_stats:
            log.info("the telemetry hub %s keeps this device's stats events again", self.address)
        else:
            return
        self._hub_drops_stats = dropped > 0

    async def run_forever(self) -> None:
        """Flush on every wake-up and every interval; while the hub is down, wait out the back-off (new events
        do not shorten it). Nothing but cancellation ends the loop."""
        delay = 1.0
        while True:
            try:
                await self.flush()
                delay, wait, backing_off = 1.0, self.interval_s, False
                self.failures = 0
            except Exception as exc:  # noqa: BLE001 - an RPC error, a full outbox disk: report, back off, go on
                self.failures += 1
                code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else type(exc).__name__
                if self.failures in (1, 2, 4) or self.failures % 10 == 0:  # not a warning per event
                    log.warning("telemetry hub %s unreachable (%s); %s events wait in the outbox, retry in %.0fs",
                                self.address, code, self._count(), delay)
                wait = delay * random.uniform(0.8, 1.2)
                delay, backing_off = min(delay * 2, self.backoff_max_s), True
            if backing_off:
                await asyncio.sleep(wait)
                self._wake.clear()
                continue
            if await wait_event(self._wake, wait):
                self._wake.clear()

    def _count(self) -> int | str:
        try:
            return self.outbox.count()
        except Exception:  # noqa: BLE001 - only for a log line
            return "?"

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
