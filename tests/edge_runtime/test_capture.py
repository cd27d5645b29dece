"""Field capture end to end: the real runtime on loopback, tritonclient as the app, the real SeaweedFS as S3.
Captured requests arrive as Parquet that pandas reads back exactly; labels join before upload and go home as
records after; the disk floor stops capture, not serving; a full spool drops oldest first; an S3 outage is caught
up afterwards."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading

import grpc
import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as triton

from edge_runtime.report.capture.client import send_label
from edge_runtime.report.capture.service import add_capture_service
from edge_runtime.serve.servicer import RepositoryControl
from edgeloop_core.contract.captures import (
    CAPTURE_COLUMNS,
    CAPTURE_GROUP_PARAMETER,
    CAPTURE_PAYLOAD_PARAMETER,
    CaptureLayout,
    tensor_array,
)
from edgeloop_core.errors import Unauthenticated
from edgeloop_core.protos import capture_pb2 as cpb
from edgeloop_core.protos import capture_pb2_grpc
from edgeloop_core.store import ObjectStore
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until

pytestmark = pytest.mark.integration
MODEL, DEVICE = "digits-cnn", "test-jetson"


def start_edge(store, edge_settings, tmp_path, capture: dict, device: dict | None = None, *, edge_store=None):
    """A runtime serving v1 whose desired file gives the model the ``capture`` policy (``device``: the file's
    top-level capture settings)."""
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": capture}],
                                   "capture": {"shard_max_age_s": 0.2, **(device or {})}}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, retry_initial_s=0.1, retry_max_s=0.3),
                       store=edge_store)
    edge.wait_ready()
    return edge


def infer(edge: RunningEdge, x: np.ndarray, request_id: str, payload: bytes | None = None,
          group: str | None = None) -> np.ndarray:
    client = triton.InferenceServerClient(edge.address)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    parameters = {CAPTURE_PAYLOAD_PARAMETER: base64.b64encode(payload).decode()} if payload is not None else {}
    if group is not None:
        parameters[CAPTURE_GROUP_PARAMETER] = group
    result = client.infer(MODEL, [tensor], request_id=request_id, parameters=parameters or None)
    client.close()
    return result.as_numpy("logits")


def shards_in(store: ObjectStore, device: str = DEVICE) -> list[str]:
    return [k for k in store.list_keys(CaptureLayout().device_prefix(device) + "models/") if k.endswith(".parquet")]


def captured(store: ObjectStore) -> pd.DataFrame:
    frames = [pd.read_parquet(io.BytesIO(store.get_bytes(k))) for k in shards_in(store)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CAPTURE_COLUMNS))


def metric(edge: RunningEdge, name: str, **labels: str) -> float:
    return edge.app.capture.metrics.value(name, **labels)


@pytest.fixture
def published(store, signing_key, trained):
    publish_model(store, signing_key, trained, "v1")
    return store


GROUPS = ("speaker-7", None, "cam/02 left", "x" * 129, "bad\ngroup")
"""Each request's capture group parameter: two kept as sent, none, one too long and one with a control character
(both captured with ``""``)."""


def test_captures_arrive_as_parquet_that_pandas_reads_back_exactly(published, edge_settings, trained, tmp_path,
                                                                   caplog):
    caplog.set_level(logging.WARNING, logger="edge_runtime.report.capture.worker")
    edge = start_edge(published, edge_settings, tmp_path, {"sample_rate": 1.0}, {"shard_max_items": 3})
    try:
        sent = {}
        rng = np.random.default_rng(7)
        for i, batch in enumerate((1, 2, 1, 3, 1)):
            x = trained.x_val[i * 3:i * 3 + batch].astype(np.float32).copy()
            x[0, 0, 0, 0] = rng.standard_normal()  # not a value a default or a re-encoding would reproduce
            payload = rng.bytes(100 + i)  # e.g. the JPEG the tensor came from
            sent[f"req-{i}"] = (x, infer(edge, x, f"req-{i}", payload, GROUPS[i]), payload)
        wait_until(lambda: len(captured(published)) == len(sent), timeout=20)
        rows = captured(published).set_index("request_id")
        assert list(captured(published).columns) == list(CAPTURE_COLUMNS)
        for request_id, (x, y, payload) in sent.items():
            row = rows.loc[request_id]
            (given,) = row["inputs"]
            (answered,) = row["outputs"]
            assert given["name"] == "input" and given["dtype"] == "float32" and list(given["shape"]) == list(x.shape)
            assert given["data"] == x.tobytes()  # bit-identical to what the client sent
            assert answered["name"] == "logits"
            np.testing.assert_array_equal(tensor_array(answered), y)  # equal to what the client received
            assert row["payload"] == payload and row["policy"] == "sample" and row["device_id"] == DEVICE
            assert row["model"] == MODEL and row["version"] == "v1" and row["variant"] and row["target_key"]
        assert rows["capture_id"].is_unique and rows["time"].dt.tz is not None
        assert [rows.loc[f"req-{i}", "group"] for i in range(5)] == ["speaker-7", "", "cam/02 left", "", ""]
        refused = [r.getMessage() for r in caplog.records if "captured without a group" in r.getMessage()]
        assert len(refused) == 2 and not any("xxx" in m or "bad" in m for m in refused)  # the value is not logged
        wait_until(lambda: metric(edge, "edgeloop_capture_uploaded_total", kind="items") == len(sent))
        assert metric(edge, "edgeloop_capture_items_total", model=MODEL, policy="sample") == len(sent)
        stats = edge.app.capture_stats()
        assert stats["captured"][MODEL] == len(sent) and stats["uploaded"]["items"] == len(sent)
        assert edge.app.capture.spool.spooled() == 0
    finally:
        edge.stop()


def test_a_label_joins_its_spooled_capture_and_goes_home_as_a_record_after_upload(
        published, edge_settings, trained, tmp_path):
    edge = start_edge(published, edge_settings, tmp_path, {"sample_rate": 1.0},
                      {"shard_max_items": 2, "shard_max_age_s": 3600})

    async def serve_labels() -> tuple[grpc.aio.Server, int]:  # a real gRPC server on the runtime's loop
        server = grpc.aio.server()
        add_capture_service(server, edge.app.capture, RepositoryControl(True, "s3cret"))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = edge.call(serve_labels())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    label = capture_pb2_grpc.CaptureServiceStub(channel).Label
    auth = (("authorization", "Bearer s3cret"),)
    try:
        x = trained.x_val[:1].astype(np.float32)
        infer(edge, x, "req-a")
        wait_until(lambda: edge.app.capture.spool.spooled() == 1)
        joined = label(cpb.LabelRequest(request_id="req-a", model_name=MODEL, class_index=3, source="operator"),
                       metadata=auth)
        assert (joined.outcome, joined.captures) == ("joined", 1)

        infer(edge, x, "req-b")  # the second item makes a shard: both go home
        wait_until(lambda: len(captured(published)) == 2, timeout=20)
        late = send_label(f"127.0.0.1:{port}", MODEL, "req-b", '{"false_trigger": true}', source="app",
                          token="s3cret")  # what `edgeloop edge label` sends
        assert (late.outcome, late.captures) == ("record", 0)

        rows = captured(published).set_index("request_id")
        assert json.loads(rows.loc["req-a", "label"]) == 3 and rows.loc["req-a", "label_source"] == "operator"
        assert pd.isna(rows.loc["req-b", "label"])  # it came too late for the shard: see the record below
        prefix = CaptureLayout().device_prefix(DEVICE) + f"labels/{MODEL}/"
        wait_until(lambda: len(published.list_keys(prefix)) == 1, timeout=20)
        record = json.loads(published.get_bytes(published.list_keys(prefix)[0]))
        assert record["request_id"] == "req-b" and record["label"] == {"false_trigger": True}
        assert record["source"] == "app" and record["device_id"] == DEVICE

        refusals = [
            (cpb.LabelRequest(request_id="req-a", model_name=MODEL, class_index=1), (),
             grpc.StatusCode.UNAUTHENTICATED),
            (cpb.LabelRequest(request_id="req-a", model_name="other-model", class_index=1), auth,
             grpc.StatusCode.NOT_FOUND),
            (cpb.LabelRequest(request_id="req-a", model_name=MODEL, label_json="{not json"), auth,
             grpc.StatusCode.INVALID_ARGUMENT),
            (cpb.LabelRequest(request_id="", model_name=MODEL, class_index=1), auth, grpc.StatusCode.INVALID_ARGUMENT),
        ]
        with pytest.raises(Unauthenticated) as refused:
            send_label(f"127.0.0.1:{port}", MODEL, "req-a", "1")
        assert "UNAUTHENTICATED" in str(refused.value) and "\n" not in str(refused.value)
        for request, metadata, code in refusals:
            with pytest.raises(grpc.RpcError) as caught:
                label(request, metadata=metadata)
            assert caught.value.code() == code, caught.value.details()
            assert "Traceback" not in caught.value.details()
    finally:
        channel.close()
        edge.call(server.stop(0))
        edge.stop()


def test_the_disk_floor_stops_capture_while_serving_goes_on(published, edge_settings, trained, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="edge_runtime.report.capture.worker")
    edge = start_edge(published, edge_settings, tmp_path, {"sample_rate": 1.0, "disk_free_floor_bytes": 1 << 60})
    try:
        wait_until(lambda: metric(edge, "edgeloop_capture_stopped", model=MODEL, reason="disk_floor") == 1)
        for i in range(4):
            assert infer(edge, trained.x_val[i:i + 1].astype(np.float32), f"r{i}").shape == (1, 10)
        assert metric(edge, "edgeloop_capture_dropped_total", model=MODEL, reason="disk_floor") == 4
        assert edge.app.capture.spool.spooled() == 0 and not shards_in(published)
        said = [r for r in caplog.records if "capture of digits-cnn stops" in r.getMessage()]
        assert len(said) == 1 and "serving goes on" in said[0].getMessage()  # once per change, not per request
    finally:
        edge.stop()


def test_a_full_spool_drops_the_oldest_first_and_says_so(published, edge_settings, trained, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="edge_runtime.report.capture.worker")
    edge = start_edge(published, edge_settings, tmp_path, {"sample_rate": 1.0},
                      {"spool_max_bytes": 12_000, "shard_max_age_s": 3600})
    try:
        for i in range(12):  # each committed on its own (no lingering for company): the spool drops whole commits
            infer(edge, trained.x_val[i:i + 1].astype(np.float32), f"r{i:02d}")
            edge.app.capture.flush()
        edge.app.capture.drain()
        spool = edge.app.capture.spool
        kept = sorted(spool.request_of[cid][1] for cid in spool.items[MODEL])
        dropped = metric(edge, "edgeloop_capture_dropped_total", model=MODEL, reason="spool_full")
        assert 0 < len(kept) < 12 and dropped == 12 - len(kept)
        assert kept == [f"r{i:02d}" for i in range(12 - len(kept), 12)]  # the newest stay, the oldest went
        assert spool.bytes <= 12_000
        assert any("capture spool full" in r.getMessage() for r in caplog.records)
    finally:
        edge.stop()


class Outage:
    """A TCP forwarder in front of the real S3 server that can be cut (connections refused and dropped) and
    restored on the same port: an S3 outage as a device sees it."""

    def __init__(self, target_port: int) -> None:
        self.target, self.conns, self.listener = target_port, [], None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.up()

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept(); close alone would not
        self.listener.close()
        for conn in self.conns:
            conn.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_an_s3_outage_is_caught_up_afterwards(published, edge_settings, trained, tmp_path, local_s3):
    from urllib.parse import urlparse

    outage = Outage(urlparse(local_s3.endpoint_url).port)
    through = ObjectStore(published.bucket, endpoint_url=f"http://127.0.0.1:{outage.port}", connect_timeout_s=0.5,
                          read_timeout_s=1.0, max_attempts=1)
    edge = start_edge(published, edge_settings, tmp_path, {"sample_rate": 1.0}, {"shard_max_items": 2},
                      edge_store=through)
    try:
        outage.down()
        for i in range(6):  # serving goes on from the cache
            infer(edge, trained.x_val[i:i + 1].astype(np.float32), f"r{i}")
        wait_until(lambda: metric(edge, "edgeloop_capture_upload_failing") == 1, timeout=20)
        assert edge.app.uploader.failing and not shards_in(published)
        outage.up()
        wait_until(lambda: len(captured(published)) == 6, timeout=30)
        assert sorted(captured(published)["request_id"]) == [f"r{i}" for i in range(6)]
        wait_until(lambda: metric(edge, "edgeloop_capture_upload_failing") == 0)
    finally:
        edge.stop()
        outage.down()


def test_hard_examples_are_judged_by_the_models_task_off_the_request_path(published, edge_settings, trained,
                                                                          tmp_path):
    edge = start_edge(published, edge_settings, tmp_path,
                      {"hard_examples": {"margin_below": 0.999999}}, {"shard_max_items": 4})
    try:
        for i in range(4):  # near-blank images: no digit, so no confident answer (a small top-1 margin)
            infer(edge, np.full((1, 1, 8, 8), 0.01 * i, np.float32), f"hard-{i}")
        wait_until(lambda: len(captured(published)) == 4, timeout=20)
        rows = captured(published)
        assert set(rows["policy"]) == {"margin"}  # no random sample: the rule fired, and says how hard
        assert ((rows["score"] >= 0) & (rows["score"] < 0.999999)).all()
    finally:
        edge.stop()
