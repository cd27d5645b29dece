"""Report step: telemetry events go into an on-disk outbox (SQLite) first, and a sender forwards them to the hub.

At-least-once: an event leaves the outbox only after the hub acknowledged its id; the hub de-duplicates ids, so a
resend after a lost acknowledgement stores nothing twice. While the hub is down the sender backs off; events
written meanwhile (and across restarts) wait in the outbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from edge_runtime.protos import telemetry_pb2 as pb
from edge_runtime.protos import telemetry_pb2_grpc

log = logging.getLogger(__name__)


class Outbox:
    """A SQLite table of events not yet acknowledged by the hub. Safe to use from several threads."""

    def __init__(self, path: Path, device_id: str) -> None:
        self.device_id = device_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                         "ts_ms INTEGER NOT NULL, payload TEXT NOT NULL)")
        self._lock = threading.Lock()

    def add(self, kind: str, payload: dict[str, Any]) -> str:
        """Store an event; returns its id."""
        event_id = str(uuid.uuid4())
        with self._lock:
            self._db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?)",
                             (event_id, kind, int(time.time() * 1000), json.dumps(payload, default=str)))
        return event_id

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
    """Forwards the outbox to the hub in batches; backs off exponentially while the hub is unreachable."""

    def __init__(self, outbox: Outbox, address: str, token: str | None, *, interval_s: float = 30.0,
                 backoff_max_s: float = 60.0) -> None:
        self.outbox = outbox
        self.address = address
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None

    def wake(self) -> None:
        """Send soon (a new event)."""
        self._wake.set()

    async def flush(self) -> int:
        """Send everything pending; returns how many events the hub acknowledged. Raises grpc.RpcError."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        stub = telemetry_pb2_grpc.TelemetryHubStub(self._channel)
        sent = 0
        while events := self.outbox.pending():
            reply = await stub.Report(pb.ReportRequest(device_id=self.outbox.device_id, events=events),
                                      metadata=self._metadata, timeout=10)
            self.outbox.acknowledge(list(reply.acknowledged_ids))
            sent += len(reply.acknowledged_ids)
            if not reply.acknowledged_ids:
                break
        return sent

    async def run_forever(self) -> None:
        """Flush on every wake-up and every interval; back off while the hub is down."""
        delay = 1.0
        while True:
            try:
                await self.flush()
                delay, wait = 1.0, self.interval_s
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                log.warning("telemetry hub %s unreachable (%s); %d events wait in the outbox, retry in %.0fs",
                            self.address, code, self.outbox.count(), delay)
                wait, delay = delay, min(delay * 2, self.backoff_max_s)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
                self._wake.clear()
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
