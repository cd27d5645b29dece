"""kill -9 while the capture worker spools and rolls and the uploader uploads: after a restart every committed item
arrives in S3, and none arrives twice. The capture runs in a real subprocess against the real SeaweedFS; requests
are offered as the servicer offers them (the model is a plain record of the facts capture reads from a
ServingModel: name, version, variant, target key, task)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from edge_runtime.report.capture import CaptureMetrics, FieldCapture, Uploader
from edge_runtime.report.capture.records import read_rows, shard_ids
from edgeloop_core.contract.captures import CaptureLayout, CapturePolicy, CaptureSettings
from tests.edge_runtime.conftest import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DEVICE = "crash-device"
SETTINGS = CaptureSettings(shard_max_items=3, shard_max_age_s=0.05, queue_items=64)
POLICY = CapturePolicy(sample_rate=1.0, items_per_hour=None, bytes_per_day=None, disk_free_floor_bytes=0)

CAPTURING = f"""
import sys, time
from pathlib import Path
from types import SimpleNamespace
import numpy as np
from edge_runtime.report.capture import CaptureMetrics, FieldCapture, Uploader
from edgeloop_core.contract.captures import CaptureLayout, CapturePolicy, CaptureSettings
from edgeloop_core.contract.manifest import Task
from edgeloop_core.protos import inference_pb2 as pb
from edgeloop_core.store import ObjectStore

root, bucket, endpoint, start = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
settings = CaptureSettings.model_validate_json({SETTINGS.model_dump_json()!r})
policy = CapturePolicy.model_validate_json({POLICY.model_dump_json()!r})
capture = FieldCapture(Path(root), {DEVICE!r}, lambda: (settings, {{"m": policy}}), CaptureMetrics())
capture.start()
uploader = Uploader(capture.spool, ObjectStore(bucket, endpoint_url=endpoint), CaptureLayout(), {DEVICE!r},
                    capture.metrics, retry_initial_s=0.05, idle_s=0.05)
capture.on_ready = uploader.wake.set
uploader.start()
model = SimpleNamespace(name="m", version="v1", plan=SimpleNamespace(variant=SimpleNamespace(name="fp32"),
                        target_key="ort1.20-cpu-x86_64-fp32"), manifest=SimpleNamespace(task=Task()))
for i in range(start, start + 100000):
    request = pb.ModelInferRequest(model_name="m", id=f"r{{i}}")
    capture.offer(request, model, {{"x": np.full((1, 4), i, np.float32)}}, {{"y": np.full((1, 2), i, np.float32)}})
    time.sleep(0.002)
"""


def uploaded_ids(store) -> Counter:
    prefix = CaptureLayout().device_prefix(DEVICE) + "models/"
    ids: Counter = Counter()
    for key in store.list_keys(prefix):
        ids.update(pd.read_parquet(io.BytesIO(store.get_bytes(key)), columns=["capture_id"])["capture_id"])
    return ids


def committed_ids(root: Path) -> set[str]:
    """What the spool holds on disk right now: committed items, and shards not yet home."""
    ids = {row["capture_id"] for p in root.glob("items/*/*.arrow") for row in read_rows(p)}
    for shard in [*root.glob("staging/*/*/*.parquet"), *root.glob("ready/*/*/*.parquet")]:
        ids.update(shard_ids(shard))
    return ids


def test_kill_9_while_spooling_and_uploading_loses_no_committed_item_and_uploads_none_twice(
        store, local_s3, tmp_path):
    root = tmp_path / "capture"
    env = {**os.environ, **local_s3.env(), "PYTHONPATH": str(ROOT)}
    before: set[str] = set()
    for run, delay in enumerate((0.05, 0.27)):  # killed at different moments of the spool/roll/upload cycle
        process = subprocess.Popen([sys.executable, "-c", CAPTURING, str(root), store.bucket, local_s3.endpoint_url,
                                    str(run * 100000)], env=env, cwd=ROOT)
        shards_before = len(store.list_keys(CaptureLayout().device_prefix(DEVICE)))
        try:
            wait_until(lambda n=shards_before: len(store.list_keys(CaptureLayout().device_prefix(DEVICE))) >= n + 2,
                       timeout=30, interval=0.1)
            time.sleep(delay)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        before |= committed_ids(root) | set(uploaded_ids(store))

    capture = FieldCapture(root, DEVICE, lambda: (SETTINGS, {"m": POLICY}), CaptureMetrics())
    capture.start()  # finishes what the kills interrupted
    try:
        capture.roll_due(force=True)
        Uploader(capture.spool, store, CaptureLayout(), DEVICE, capture.metrics).upload_ready()
    finally:
        capture.stop()
    after = uploaded_ids(store)
    assert before <= set(after), f"lost: {sorted(before - set(after))[:5]}"
    twice = [cid for cid, count in after.items() if count > 1]
    assert not twice, f"uploaded twice: {twice[:5]}"
    assert not list(root.glob("**/*.tmp")) and capture.spool.ready() == []


def _item(capture_id: str, request_id: str):
    from datetime import datetime, timezone

    import numpy as np

    from edge_runtime.report.capture.records import CapturedItem, tensor_record

    return CapturedItem(capture_id=capture_id, time=datetime.now(timezone.utc), device_id=DEVICE, model="m",
                        version="v1", variant="fp32", target_key="t", request_id=request_id, policy="sample",
                        score=None, inputs=[tensor_record("x", np.arange(4, dtype=np.float32))],
                        outputs=[tensor_record("y", np.ones(2, np.float32))])


def test_a_kill_between_writing_a_shard_and_removing_its_items_rolls_none_of_them_twice(tmp_path):
    from edge_runtime.report.capture.records import new_capture_id, write_shard
    from edge_runtime.report.capture.spool import Spool
    from edgeloop_core.contract.captures import shard_name

    spool = Spool(tmp_path, 1 << 20)
    items = [_item(new_capture_id(), f"r{i}") for i in range(3)]
    for item in items:
        spool.add(item)
    rows = [item.row() for item in items[:2]]  # what roll() had written when the kill came
    write_shard(tmp_path / "staging" / "m" / "2026-12-05" / shard_name(r["capture_id"] for r in rows), rows)

    restarted = Spool(tmp_path, 1 << 20)
    assert set(restarted.items["m"]) == {items[2].capture_id}  # the staged two are in their shard only
    (ready,) = restarted.ready()
    assert sorted(shard_ids(ready)) == sorted(r["capture_id"] for r in rows)
    restarted.roll("m", 10)
    every = [cid for path in restarted.ready() for cid in shard_ids(path)]
    assert sorted(every) == sorted(item.capture_id for item in items)


def test_an_upload_repeated_after_a_kill_overwrites_the_same_key(store, tmp_path):
    from edge_runtime.report.capture.spool import Spool

    spool = Spool(tmp_path, 1 << 20)
    for i in range(2):
        spool.add(_item(f"{i:016x}-000000000000", f"r{i}"))
    spool.roll("m", 10)
    (ready,) = spool.ready()
    kept = ready.read_bytes()
    uploader = Uploader(spool, store, CaptureLayout(), DEVICE, CaptureMetrics())
    assert uploader.upload_ready() == 1 and not ready.exists()
    ready.write_bytes(kept)  # killed after the upload, before the file was removed: it is sent again
    assert uploader.upload_ready() == 1
    keys = store.list_keys(CaptureLayout().device_prefix(DEVICE))
    assert len(keys) == 1 and sum(uploaded_ids(store).values()) == 2
