"""The capture spool: captured items on the device's disk until they are home, crash-safe and bounded.

Under ``root``::

    items/<model>/<capture_id>.arrow        committed items, one file per commit (Arrow IPC, written atomically;
                                            named by its first item; all of one model and one UTC day)
    labels/<model>/<label_id>.json          labels waiting for their spooled items' shard
    staging/<model>/<date>/<shard>.parquet  a shard whose items are being removed from items/
    ready/<model>/<date>/<shard>.parquet    shards waiting for upload
    records/<model>/<date>/<label_id>.json  labels that found no spooled item, waiting for upload

Every file is written through :func:`edgeloop_core.files.atomic_output`, so a kill leaves either the old state or
the new one; the worker commits what gathered in one file (one fsync for many items; an item is committed once
its file is in ``items/``). A shard holds whole
item files; it is written to ``staging/`` first, then its items are removed, then it moves to ``ready/``;
start-up finishes a move a kill interrupted (items a staged shard holds are removed, not rolled again), so no
committed item is lost and none goes into two shards. Above ``max_bytes`` the oldest data goes first (ready shards,
then items), counted and reported by the caller.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from edge_runtime.report.capture.records import (
    CapturedItem,
    read_rows,
    read_table,
    shard_ids,
    table_of,
    write_items,
    write_shard_table,
)
from edgeloop_core.contract.captures import shard_name
from edgeloop_core.files import place, write_atomic

log = logging.getLogger(__name__)


class Spool:
    """The spool under ``root``, at most ``max_bytes`` on disk. Items, labels and rolls come from one thread (the
    capture worker); the uploader takes ready files from another; the lock keeps the byte count true."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self.lock = threading.Lock()
        self.by_request: dict[tuple[str, str], set[str]] = defaultdict(set)
        """(model, request id) → capture ids of its items still in items/ (what a label can still join)."""
        self.items: dict[str, dict[str, Path]] = defaultdict(dict)
        """model → capture id → its item file, oldest first."""
        self.files: dict[str, dict[Path, list[str]]] = defaultdict(dict)
        """model → item file → the capture ids it holds, oldest file first."""
        self.request_of: dict[str, tuple[str, str]] = {}
        """capture id → (model, request id), for the items in ``by_request``."""
        self.bytes = 0
        self._recover()

    # --- start-up
    def _recover(self) -> None:
        for tmp in self.root.rglob(".*.tmp"):  # what a kill left half-written: never committed
            tmp.unlink(missing_ok=True)
        for staged in sorted((self.root / "staging").rglob("*.parquet")):
            self._finish_roll(staged)
        for path in sorted((self.root / "items").rglob("*.arrow")):
            self._register(path, read_rows(path))
        for label in sorted((self.root / "labels").rglob("*.json")):  # its items went home, or were dropped
            record = json.loads(label.read_text())
            if not self.by_request.get((record["model"], record["request_id"])):
                self._as_record(record)
                label.unlink()
        self.bytes = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _register(self, path: Path, rows: list[dict[str, Any]]) -> None:
        model = rows[0]["model"]
        self.files[model][path] = [row["capture_id"] for row in rows]
        for row in rows:
            self.items[model][row["capture_id"]] = path
            if row["request_id"]:
                self._remember(model, row["request_id"], row["capture_id"])

    def _finish_roll(self, staged: Path, held: set[str] | None = None) -> None:
        """Remove the item files a staged shard holds (whole files, each named by its first item; ``held``: its
        capture ids when known, else read from it), then make the shard ready for upload."""
        model = staged.parent.parent.name
        held = set(shard_ids(staged)) if held is None else held
        for path in (self.root / "items" / model).glob("*.arrow"):
            if path.stem in held:
                path.unlink(missing_ok=True)
        ready = self.root / "ready" / staged.relative_to(self.root / "staging")
        ready.parent.mkdir(parents=True, exist_ok=True)
        place(staged, ready)

    # --- the worker's side
    def add(self, *items: CapturedItem) -> list[tuple[str, str]]:
        """Commit ``items`` (oldest first; one model, one UTC day) to disk in one file; returns the (model, capture
        id) of the items dropped to stay under ``max_bytes`` (oldest first)."""
        first = items[0]
        path = self.root / "items" / first.model / f"{first.capture_id}.arrow"
        size = write_items(path, list(items))
        with self.lock:
            self.bytes += size
            self._register(path, [{"model": i.model, "capture_id": i.capture_id, "request_id": i.request_id}
                                  for i in items])
            return self._evict()

    def _evict(self) -> list[tuple[str, str]]:
        """Oldest first until under the cap: ready shards, then spooled items (holding the lock)."""
        dropped: list[tuple[str, str]] = []
        if self.bytes <= self.max_bytes:
            return dropped
        shards = sorted((self.root / "ready").rglob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)
        while self.bytes > self.max_bytes and shards:
            shard = shards.pop(0)
            dropped += [(shard.parent.parent.name, capture_id) for capture_id in shard_ids(shard)]
            self._remove(shard)
        while self.bytes > self.max_bytes and sum(len(files) for files in self.files.values()) > 1:
            # each model's files are in capture order (one worker adds them; start-up reads them sorted): the
            # oldest is the first of one of them. Never the file just committed (it is the newest).
            path, model = min((next(iter(files)), model) for model, files in self.files.items() if files)
            dropped += [(model, capture_id) for capture_id in self._drop_file(model, path)]
        return dropped

    def _drop_file(self, model: str, path: Path) -> list[str]:
        """Forget and remove one item file (holding the lock); returns the capture ids it held."""
        ids = self.files[model].pop(path)
        for capture_id in ids:
            self.items[model].pop(capture_id, None)
            self._forget(model, capture_id)
        self._remove(path)
        return ids

    def _remember(self, model: str, request_id: str, capture_id: str) -> None:
        self.by_request[(model, request_id)].add(capture_id)
        self.request_of[capture_id] = (model, request_id)

    def _forget(self, model: str, capture_id: str) -> None:
        key = self.request_of.pop(capture_id, None)
        if key is not None:
            self.by_request[key].discard(capture_id)
            if not self.by_request[key]:
                del self.by_request[key]

    def _remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.bytes -= size

    def add_label(self, record: dict[str, Any]) -> int:
        """Keep a label (``label_id``, ``model``, ``request_id``, ...): joined to the request's spooled items when
        there are any (returns how many), else queued as its own record (returns 0)."""
        joined = len(self.by_request.get((record["model"], record["request_id"]), ()))
        if joined:
            self._write(self.root / "labels" / record["model"] / f"{record['label_id']}.json", record)
        else:
            self._as_record(record)
        return joined

    def _as_record(self, record: dict[str, Any]) -> None:
        day = datetime.fromisoformat(record["time"]).date().isoformat()
        self._write(self.root / "records" / record["model"] / day / f"{record['label_id']}.json", record)

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        write_atomic(path, data)
        with self.lock:
            self.bytes += len(data)

    def due(self, model: str, now_ns: int, max_items: int, max_age_s: float) -> bool:
        """Whether ``model``'s spooled items make a shard now: ``max_items`` of them, or the oldest ``max_age_s``
        old (capture ids begin with their time)."""
        items = self.items.get(model) or {}
        return len(items) >= max_items or bool(items) and now_ns - int(next(iter(items))[:16], 16) >= max_age_s * 1e9

    def roll(self, model: str, max_items: int) -> int:
        """Move up to ``max_items`` of ``model``'s oldest spooled items, with their labels, into shards (one per UTC
        day) ready for upload; returns how many items moved."""
        with self.lock:
            chosen, count = [], 0
            for path, ids in self.files.get(model, {}).items():  # whole files, oldest first
                if chosen and count + len(ids) > max_items:
                    break
                chosen.append(path)
                count += len(ids)
        labels = self._labels(model)
        by_day: dict[str, list[tuple[Path, pa.Table]]] = defaultdict(list)
        joined: set[str] = set()
        for path in chosen:  # Arrow tables throughout: rows become Python objects only to take a label
            table = read_table(path)
            if labels:
                table = _with_labels(table, labels, joined)
            by_day[table.column("time")[0].as_py().date().isoformat()].append((path, table))
        moved = 0
        for day, files in by_day.items():
            day_table = pa.concat_tables([table for _, table in files])
            ids = day_table.column("capture_id").to_pylist()
            staged = self.root / "staging" / model / day / shard_name(ids)
            size = write_shard_table(staged, day_table)
            with self.lock:
                self.bytes += size
                for path, _ in files:
                    self._drop_file(model, path)
            self._finish_roll(staged, set(ids))
            moved += len(ids)
        self._settle_labels(model, joined)
        return moved

    def _labels(self, model: str) -> dict[str, dict[str, Any]]:
        """Request id → its latest label, of ``model``'s waiting labels."""
        records = [json.loads(p.read_text()) for p in (self.root / "labels" / model).glob("*.json")]
        return {r["request_id"]: r for r in sorted(records, key=lambda r: r["time"])}

    def _settle_labels(self, model: str, joined: set[str]) -> None:
        """Remove ``model``'s waiting labels that no spooled item is left for: joined in a shard just written, or
        (their items dropped for space) sent as records instead."""
        for path in list((self.root / "labels" / model).glob("*.json")):
            record = json.loads(path.read_text())
            if self.by_request.get((model, record["request_id"])):
                continue
            if record["request_id"] not in joined:
                self._as_record(record)
            with self.lock:
                self._remove(path)

    # --- the uploader's side
    def ready(self) -> list[Path]:
        """Shards and label records waiting for upload, oldest first."""
        found = [*(self.root / "ready").rglob("*.parquet"), *(self.root / "records").rglob("*.json")]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns if p.exists() else 0)

    def uploaded(self, path: Path) -> None:
        """``path`` is home: remove it."""
        with self.lock:
            self._remove(path)

    def spooled(self) -> int:
        """Items on disk not yet in a shard."""
        with self.lock:
            return sum(len(items) for items in self.items.values())


def _with_labels(table: pa.Table, labels: dict[str, dict[str, Any]], joined: set[str]) -> pa.Table:
    """``table`` with the ``labels`` (request id → label record) of its requests in its label columns; adds the
    request ids it labelled to ``joined``."""
    if not labels.keys() & set(table.column("request_id").to_pylist()):
        return table
    rows = table.to_pylist()
    for row in rows:
        label = labels.get(row["request_id"])
        if label is not None:
            row.update(label=json.dumps(label["label"]), label_source=label["source"],
                       label_time=datetime.fromisoformat(label["time"]))
            joined.add(row["request_id"])
    return table_of(rows)


def item_day(path: Path) -> str:
    """The ``<yyyy-mm-dd>`` folder a ready file lies in."""
    return path.parent.name


def file_model(path: Path) -> str:
    """The ``<model>`` folder a ready file lies in."""
    return path.parent.parent.name

