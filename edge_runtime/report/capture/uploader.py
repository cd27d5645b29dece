"""Sends the spool's ready shards and label records to S3 (:class:`~edgeloop_core.contract.captures.
CaptureLayout`), oldest first, at least once: a file is removed from the spool only after its upload succeeded, and
its key is derived from its content, so an upload repeated after a kill overwrites the same object. A failing store
is retried with back-off for as long as it fails; the loop catches everything, says so once per outage, and goes
on."""

from __future__ import annotations

import logging
import threading
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from edgeloop_core.contract.captures import CaptureLayout

if TYPE_CHECKING:
    from edge_runtime.report.capture.metrics import CaptureMetrics
    from edge_runtime.report.capture.spool import Spool
    from edgeloop_core.store import ObjectStore

log = logging.getLogger(__name__)


class Uploader:
    """A background thread that empties ``spool``'s ready files into ``store`` under ``layout`` for ``device``."""

    def __init__(self, spool: Spool, store: ObjectStore, layout: CaptureLayout, device: str,
                 metrics: CaptureMetrics, *, retry_initial_s: float = 2.0, retry_max_s: float = 300.0,
                 idle_s: float = 5.0) -> None:
        self.spool, self.store, self.layout, self.device = spool, store, layout, device
        self.metrics = metrics
        self.retry_initial_s, self.retry_max_s, self.idle_s = retry_initial_s, retry_max_s, idle_s
        self.wake, self._stop = threading.Event(), threading.Event()
        self.failing = ""
        """Why the last upload failed (empty while uploads succeed)."""
        self.thread = threading.Thread(target=self._run, name="edgeloop-capture-upload", daemon=True)

    def key_of(self, path: Path) -> str:
        """The object key of a ready shard (``ready/<model>/<day>/<shard>``) or label record (``records/...``)."""
        model, day = path.parent.parent.name, date.fromisoformat(path.parent.name)
        if path.suffix == ".json":
            return self.layout.label_key(self.device, model, day, path.stem)
        return self.layout.shard_key(self.device, model, day, path.name)

    def upload_ready(self) -> int:
        """Upload every ready file once, oldest first; returns how many went home (raises on the first failure)."""
        sent = 0
        for path in self.spool.ready():
            if not path.exists():
                continue  # dropped for space meanwhile
            shard = path.suffix == ".parquet"
            items = 0
            if shard:
                from edge_runtime.report.capture.records import shard_items

                try:
                    items = shard_items(path)
                except FileNotFoundError:
                    continue  # dropped for space meanwhile
            try:
                self.store.put_file(self.key_of(path), path, content_type="application/vnd.apache.parquet"
                                    if shard else "application/json")
            except FileNotFoundError:
                continue  # dropped for space while it was being sent
            self.spool.uploaded(path)
            self.metrics.uploaded.labels("shards" if shard else "labels").inc()
            if items:
                self.metrics.uploaded.labels("items").inc(items)
            sent += 1
        return sent

    def _run(self) -> None:
        delay = self.retry_initial_s
        while not self._stop.is_set():
            try:
                self.upload_ready()
            except Exception as exc:  # noqa: BLE001 - a background loop reports and goes on
                if not self.failing:
                    log.warning("capture upload failed, retrying with back-off while it fails: %s", exc)
                self.failing = str(exc) or type(exc).__name__
                self.metrics.upload_failing.set(1)
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            if self.failing:
                log.warning("capture uploads resumed")
                self.failing = ""
                self.metrics.upload_failing.set(0)
            delay = self.retry_initial_s
            self.wake.wait(self.idle_s)
            self.wake.clear()

    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (an upload in flight finishes or fails first; the next start sends it again)."""
        self._stop.set()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout_s)
