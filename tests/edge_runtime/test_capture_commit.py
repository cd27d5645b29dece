"""What keeps capturing every request cheap (issue 26's bench: 100% capture costs ≤ 30% of throughput): the worker
commits requests arriving one by one in few files (group commit: one fsync, and later one removal, for many items),
a roll moves items and their labels into a shard as Arrow data, and a tensor is stored as the same bytes on the
fast path (non-contiguous and big-endian arrays included)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from edge_runtime.report.capture import CaptureMetrics, FieldCapture
from edge_runtime.report.capture.records import tensor_record
from edgeloop_core.contract.captures import CapturePolicy, CaptureSettings, tensor_array
from edgeloop_core.contract.manifest import Task
from edgeloop_core.protos import inference_pb2 as pb

SETTINGS = CaptureSettings(shard_max_items=10_000, shard_max_age_s=3600)
POLICY = CapturePolicy(sample_rate=1.0, items_per_hour=None, bytes_per_day=None, disk_free_floor_bytes=0)
MODEL = SimpleNamespace(name="m", version="v1", plan=SimpleNamespace(variant=SimpleNamespace(name="fp32"),
                        target_key="ort-cpu-fp32"), manifest=SimpleNamespace(task=Task()))
"""The facts capture reads from a ServingModel (name, version, variant, target key, task)."""


def _offer(capture: FieldCapture, i: int) -> None:
    request = pb.ModelInferRequest(model_name="m", id=f"r{i}")
    capture.offer(request, MODEL, {"x": np.full((1, 4), i, np.float32)}, {"y": np.full((1, 2), i, np.float32)})


def test_requests_arriving_one_by_one_are_committed_many_to_a_file(tmp_path: Path):
    capture = FieldCapture(tmp_path, "d", lambda: (SETTINGS, {"m": POLICY}), CaptureMetrics())
    capture.start()
    try:
        for i in range(200):  # ~2,000 requests/s, each offered alone, as the servicer does
            _offer(capture, i)
            time.sleep(0.0005)
        capture.drain()
        files = list(tmp_path.glob("items/m/*.arrow"))
        assert capture.metrics.value("edgeloop_capture_items_total", model="m", policy="sample") == 200
        assert len(files) <= 20, f"{len(files)} commits for 200 requests: the worker commits too few at a time"
        labelled = capture.label("m", "r7", {"class": 3}, "operator")
        assert labelled == ("joined", 1)
        assert capture.roll_due(force=True) == 200
    finally:
        capture.stop()
    (shard,) = tmp_path.glob("ready/m/*/*.parquet")
    rows = pd.read_parquet(shard)
    assert list(rows["capture_id"]) == sorted(rows["capture_id"]) and len(rows) == 200
    assert rows.set_index("request_id").loc["r7", "label"] == '{"class": 3}'
    assert rows["label"].notna().sum() == 1 and not list(tmp_path.glob("items/m/*.arrow"))
    first = rows.set_index("request_id").loc["r5", "inputs"][0]
    np.testing.assert_array_equal(tensor_array(first), np.full((1, 4), 5, np.float32))


def test_tensors_keep_their_bytes_in_c_order_and_little_endian():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1)  # not contiguous
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    for array in (x, big, np.arange(5, dtype=np.float16)[::2]):
        record = tensor_record("t", array)
        assert record["data"] == np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()
        assert record["dtype"] == array.dtype.name and record["shape"] == list(array.shape)
        np.testing.assert_array_equal(tensor_array(record), array)


def test_lone_requests_at_a_low_rate_are_gathered_into_few_commits(tmp_path: Path):
    """1% of ~5,000 requests/s: a sampled request every ~20 ms, each alone in the queue. Committed one file (two
    fsyncs) each, they cost 6-9% of the server's core (bench/serve); gathered for COMMIT_LINGER_S, a few files."""
    capture = FieldCapture(tmp_path, "d", lambda: (SETTINGS, {"m": POLICY}), CaptureMetrics())
    capture.start()
    try:
        for i in range(20):
            _offer(capture, i)
            time.sleep(0.02)
        assert capture.label("m", "r19", 4, "app") == ("joined", 1)  # the newest, still gathering: committed first
        capture.drain()
        files = list(tmp_path.glob("items/m/*.arrow"))
        assert capture.spool.spooled() == 20
        assert len(files) <= 5, f"{len(files)} commits for 20 requests 20 ms apart: lone items committed alone"
    finally:
        capture.stop()


def test_what_gathered_is_committed_by_a_stop_and_survives_it(tmp_path: Path):
    capture = FieldCapture(tmp_path, "d", lambda: (SETTINGS, {"m": POLICY}), CaptureMetrics())
    capture.start()
    for i in range(3):
        _offer(capture, i)
    capture.stop()  # at once: the worker is still waiting for company
    restarted = FieldCapture(tmp_path, "d", lambda: (SETTINGS, {"m": POLICY}), CaptureMetrics())
    restarted.start()
    try:
        assert sorted(restarted.spool.request_of[c][1] for c in restarted.spool.items["m"]) == ["r0", "r1", "r2"]
    finally:
        restarted.stop()


def test_an_item_spooled_before_the_group_column_rolls_into_a_shard_with_an_empty_group(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from edge_runtime.report.capture.records import SCHEMA, CapturedItem, new_capture_id, table_of
    from edge_runtime.report.capture.spool import Spool
    from edgeloop_core.contract.captures import CAPTURE_COLUMNS

    def item(request_id: str, group: str) -> CapturedItem:
        return CapturedItem(capture_id=new_capture_id(), time=datetime.now(timezone.utc), device_id="d", model="m",
                            version="v1", variant="fp32", target_key="t", request_id=request_id, policy="sample",
                            score=None, inputs=[tensor_record("x", np.arange(4, dtype=np.float32))],
                            outputs=[tensor_record("y", np.ones(2, np.float32))], group=group)

    old = item("r-old", "")
    old_table = table_of([old.row()]).drop_columns(["group"])  # what the runtime spooled before the column
    path = tmp_path / "items" / "m" / f"{old.capture_id}.arrow"
    path.parent.mkdir(parents=True)
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, old_table.schema) as writer:
        writer.write_table(old_table)
    spool = Spool(tmp_path, 1 << 20)  # a restart after the upgrade
    spool.add(item("r-new", "speaker-7"))
    assert spool.roll("m", 10) == 2
    (shard,) = tmp_path.glob("ready/m/*/*.parquet")
    frame = pd.read_parquet(shard)
    assert list(frame.columns) == list(CAPTURE_COLUMNS) == SCHEMA.names
    rows = frame.set_index("request_id")
    assert rows.loc["r-old", "group"] == "" and rows.loc["r-new", "group"] == "speaker-7"
