"""Field capture and field statistics with ``serving_engine: triton``: the real runtime, the real ``tritonserver``
(Python backend) on loopback, tritonclient as the app, the real SeaweedFS as S3. The Python-backend model samples
each request and hands what it takes to the runtime over the tap's Unix socket; captures arrive as Parquet equal to
what was sent and received, and field statistics count exactly what the builtin server would. Where Triton serves a
model with a backend edgeloop's code does not run in, the runtime says so once."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton

from edge_runtime.report.capture.triton_tap import FRAMES, TritonTap
from edge_runtime.serve.triton.dataplane import TritonInstall, TritonServer, model_config
from edgeloop_core.contract import Task
from edgeloop_core.contract.captures import CAPTURE_PAYLOAD_PARAMETER, CAPTURE_PAYLOAD_TYPE_PARAMETER
from edgeloop_core.drift import FieldCounts, build_baseline
from tests.edge_runtime.conftest import RunningEdge, free_port, publish_model, wait_until
from tests.edge_runtime.test_capture import captured, metric
from tests.edge_runtime.test_triton import triton_python  # noqa: F401 - the fixture

MODEL = "digits-cnn"


def tapped(edge: RunningEdge) -> TritonTap:
    """The runtime's tap: the app starts it when Triton serves."""
    assert edge.app.tap is not None, "the runtime did not start the Triton tap"
    return edge.app.tap


def stop(edge: RunningEdge) -> None:
    tap_dir = edge.app.tap.server.tap_dir if edge.app.tap is not None else None
    edge.stop()
    assert tap_dir is None or not tap_dir.exists()  # the private socket folder goes with the runtime


def published_rates(tap: TritonTap) -> dict:
    path = tap.server.tap_dir / FRAMES.CONFIG
    return json.loads(path.read_text())["models"] if path.exists() else {}


def ask(client, x: np.ndarray, request_id: str, payload: bytes | None = None) -> np.ndarray:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    parameters = {CAPTURE_PAYLOAD_PARAMETER: base64.b64encode(payload).decode(),
                  CAPTURE_PAYLOAD_TYPE_PARAMETER: "application/octet-stream"} if payload is not None else None
    return client.infer(MODEL, [tensor], request_id=request_id, parameters=parameters).as_numpy("logits")


@pytest.mark.integration
def test_triton_captures_what_the_app_sent_and_received_and_counts_field_statistics(
        store, signing_key, trained, edge_settings, tmp_path, triton_python):  # noqa: F811
    import onnxruntime as ort

    from components.data import load_digits_dataset

    train = load_digits_dataset().x_train.astype(np.float32)
    session = ort.InferenceSession(str(trained.good["fp32"]), providers=["CPUExecutionProvider"])
    task = Task(kind="classification", num_classes=10)
    baseline = build_baseline({"input": train}, {"logits": session.run(None, {"input": train})[0]}, task)
    publish_model(store, signing_key, trained, "v1", field_baseline=baseline)
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 1.0, "keep_payload": True}}],
                                   "capture": {"shard_max_age_s": 0.2, "shard_max_items": 4}}))
    edge = RunningEdge(edge_settings(store.bucket, serving_engine="triton", triton_python=triton_python,
                                     triton_backend="python", grpc_port=free_port(), triton_metrics_port=0,
                                     control_port=0, desired_file=desired, field_stats_rate=1.0,
                                     field_stats_min_samples=8))
    try:
        edge.wait_ready()
        tap = tapped(edge)
        wait_until(lambda: published_rates(tap).get(MODEL) == {"capture": 1.0, "rules": False, "field": 1.0,
                                                                  "remember": True})
        client = triton.InferenceServerClient(edge.address)
        rng = np.random.default_rng(26)
        sent, expected = {}, FieldCounts(baseline)
        for i, batch in enumerate((1, 2, 1, 3, 1)):
            x = trained.x_val[i * 3:i * 3 + batch].astype(np.float32).copy()
            x[0, 0, 0, 0] = rng.standard_normal()  # a value no default or re-encoding would reproduce
            payload = rng.bytes(50 + i)  # e.g. the JPEG the tensor came from
            y = ask(client, x, f"frame-{i}", payload)
            sent[f"frame-{i}"] = (x, y, payload)
            expected.add({"input": x}, {"logits": y}, task)
        wait_until(lambda: len(captured(store)) == len(sent), timeout=30)
        rows = captured(store).set_index("request_id")
        for request_id, (x, y, payload) in sent.items():
            row = rows.loc[request_id]
            (given,), (answered,) = row["inputs"], row["outputs"]
            assert given["name"] == "input" and given["dtype"] == "float32" and list(given["shape"]) == list(x.shape)
            assert given["data"] == x.tobytes()  # bit-identical to what the client sent
            assert answered["name"] == "logits" and answered["data"] == y.tobytes()  # what it received
            assert row["payload"] == payload and row["payload_type"] == "application/octet-stream"
            assert row["policy"] == "sample" and row["model"] == MODEL and row["version"] == "v1"
            assert row["variant"] and row["target_key"]
        assert metric(edge, "edgeloop_capture_items_total", model=MODEL, policy="sample") == len(sent)

        taken = []
        wait_until(lambda: taken.append(edge.app.field.take(MODEL)) or taken[-1] is not None)
        assert taken[-1]["samples"] == 8 and taken[-1]["version"] == "v1"
        assert taken[-1]["counts"] == expected.take()  # what the builtin server counts for the same requests

        # hard examples: the stub hands every request over, the runtime judges it by the policy's rules
        desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {
            "sample_rate": 0.0, "hard_examples": {"expression": "max(abs(logits)) >= 0"}}}],
            "capture": {"shard_max_age_s": 0.2}}))
        wait_until(lambda: published_rates(tap).get(MODEL, {}).get("rules") is True)
        time.sleep(2 * FRAMES.LOOK_S)  # the stub looks at the rates twice a second
        x = trained.x_val[20:22].astype(np.float32)
        ask(client, x, "hard-1")
        wait_until(lambda: "hard-1" in set(captured(store)["request_id"]), timeout=30)
        assert captured(store).set_index("request_id").loc["hard-1", "policy"] == "expression"
        assert tap.stale == 0 and tap.unavailable() == {}
        client.close()
    finally:
        stop(edge)


def test_a_model_triton_serves_where_edgeloop_sees_no_request_is_said_unavailable_once(tmp_path, caplog):
    """Triton's native onnxruntime backend and TensorRT plans run where edgeloop's code does not: the tap publishes
    no rates for them and says why, once, in the log and in ``unavailable()``; a Python-backend model is tapped."""
    from edge_runtime.build.engines.base import TensorInfo
    from edge_runtime.report.capture.metrics import CaptureMetrics
    from edge_runtime.report.capture.worker import FieldCapture
    from edgeloop_core.contract.captures import CapturePolicy, CaptureSettings

    repo = tmp_path / "repo"
    info = (TensorInfo("input", "FP32", (-1, 4)),), (TensorInfo("logits", "FP32", (-1, 2)),)
    for name, backend in (("native-ort", "onnxruntime"), ("plan", "tensorrt_plan"), ("stubbed", "python")):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(model_config(name, backend, *info, 8, 100, {}))
    server = TritonServer(TritonInstall(tmp_path / "tritonserver", tmp_path / "backends"), repo,
                          bind_address="127.0.0.1", grpc_port=1, metrics_port=1, log_path=tmp_path / "log")
    server.tap_dir = tmp_path / "tap"
    server.tap_dir.mkdir()
    policies = {name: CapturePolicy(sample_rate=0.01) for name in ("native-ort", "plan", "stubbed")}
    capture = FieldCapture(tmp_path / "spool", "dev", lambda: (CaptureSettings(), policies), CaptureMetrics())
    capture.refresh()
    tap = TritonTap(server, lambda: dict.fromkeys(policies, object()), capture, None)
    tap._folder = server.tap_dir
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            rates = tap.publish()
    assert rates == {"models": {"stubbed": {"capture": 0.01, "rules": False, "field": 0.0, "remember": False}}}
    assert json.loads((server.tap_dir / FRAMES.CONFIG).read_text()) == rates
    said = [r.getMessage() for r in caplog.records if "where edgeloop sees no request" in r.getMessage()]
    assert len(said) == 2  # once per model, not once per publish
    unavailable = tap.unavailable()
    assert set(unavailable) == {"native-ort", "plan"}
    assert "onnxruntime backend" in unavailable["native-ort"] and "EDGE_TRITON_BACKEND=python" in unavailable[
        "native-ort"]
    assert "tensorrt_plan backend" in unavailable["plan"] and "serving_engine builtin" in unavailable["plan"]


class Request:
    """What the stub reads of Triton's ``InferenceRequest`` (its id and parameters; the real one is a C++ type
    that exists only inside Triton's stub process)."""

    def __init__(self, request_id: str, parameters: dict | None = None) -> None:
        self._id, self._parameters = request_id, json.dumps(parameters or {})

    def request_id(self) -> str:
        return self._id

    def parameters(self) -> str:
        return self._parameters


def test_the_stub_never_waits_drops_and_counts_when_the_runtime_does_not_take_and_sends_the_count_later(tmp_path):
    tap_module = FRAMES
    (tmp_path / FRAMES.CONFIG).write_text(json.dumps({"models": {"m": {"capture": 1.0, "rules": False,
                                                                         "field": 0.0}}}))
    stub = tap_module.Tap(str(tmp_path), "m", "v3")  # nobody listens on tap.sock yet
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    started = time.perf_counter()
    for i in range(2 * tap_module.QUEUE_ITEMS):
        stub.offer(Request(f"r{i}"), {"input": x}, {"logits": x[:, :2]})
    per_offer_s = (time.perf_counter() - started) / (2 * tap_module.QUEUE_ITEMS)
    assert per_offer_s < 0.005  # a copy and a put, never a wait on the sender
    wait_until(lambda: stub._queue.qsize() == 0, timeout=30)  # each failed hand-over waits 0.2 s: a few seconds
    assert stub.dropped["capture"] == 2 * tap_module.QUEUE_ITEMS and stub.dropped["field"] == 0

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / FRAMES.SOCKET))
    listener.listen(1)
    listener.settimeout(10)
    time.sleep(0.3)  # the sender tries again 0.2 s after a failed connection (dropping meanwhile)
    stub.offer(Request("after", {"edgeloop.capture_payload": "AAE=", "n": 3}), {"input": x}, {"logits": x[:, :2]})
    conn, _ = listener.accept()
    with conn:
        from edge_runtime.report.capture.triton_tap import _read_frame

        header, inputs, outputs = FRAMES.decode(*_read_frame(conn))
    listener.close()
    stub.close()
    assert header["dropped"] == {"capture": 2 * tap_module.QUEUE_ITEMS, "field": 0}  # told with the next frame
    assert header["id"] == "after" and header["version"] == "v3" and header["field"] is None
    assert header["parameters"] == {"edgeloop.capture_payload": "AAE=", "n": 3}
    np.testing.assert_array_equal(inputs["input"], x)
    np.testing.assert_array_equal(outputs["logits"], x[:, :2])


def test_a_frame_that_does_not_describe_its_bytes_is_one_readable_error_and_ends_only_its_connection(tmp_path):
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    good = FRAMES.encode({"model": "m"}, [("input", "ids", x.dtype.str, x.shape, x.tobytes())])
    head_bytes, _ = FRAMES.PREFIX.unpack(good[:FRAMES.PREFIX.size])
    head, body = good[FRAMES.PREFIX.size:FRAMES.PREFIX.size + head_bytes], good[FRAMES.PREFIX.size + head_bytes:]
    header, inputs, _ = FRAMES.decode(head, body)
    np.testing.assert_array_equal(inputs["ids"], x)
    for bad_head, bad_body, said in ((head, body[:-8], "does not match its bytes"),
                                     (head, body + b"x", "bytes no tensor describes"),
                                     (head.replace(b"<i8", b"|O1"), body, "carries a tensor it cannot"),
                                     (head.replace(b"<i8", b"|O"), body, "carries a tensor it cannot")):
        with pytest.raises(ValueError) as error:
            FRAMES.decode(bad_head, bad_body)
        assert said in str(error.value) and "\n" not in str(error.value)

    server = TritonServer(TritonInstall(tmp_path / "bin", tmp_path / "backends"), tmp_path / "repo",
                          bind_address="127.0.0.1", grpc_port=1, metrics_port=1, log_path=tmp_path / "log")
    server.tap_dir = tmp_path
    delivered = threading.Event()
    tap = TritonTap(server, dict, None, None)
    tap.deliver = lambda *frame: delivered.set()
    tap.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as broken:
            broken.connect(str(tmp_path / FRAMES.SOCKET))
            broken.sendall(FRAMES.PREFIX.pack(len(head), len(body) - 8) + head + body[:-8])
            assert broken.recv(1) == b""  # the tap hung up on it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fine:
            fine.connect(str(tmp_path / FRAMES.SOCKET))
            fine.sendall(good)
            assert delivered.wait(5)  # another stub's frames still arrive
    finally:
        tap.stop()


def test_the_runtime_samples_with_the_stubs_draws_so_rates_mean_what_they_mean_on_the_builtin_server(tmp_path):
    """The stub's draw decides: a request it drew below the rate is captured and counted, one above is not (a fresh
    draw in the runtime would sample the stub's sample again: rate squared)."""
    from types import SimpleNamespace

    from edge_runtime.report.capture.metrics import CaptureMetrics
    from edge_runtime.report.capture.worker import FieldCapture
    from edge_runtime.report.field import FieldStatistics
    from edgeloop_core.contract.captures import CapturePolicy, CaptureSettings

    task = Task(kind="classification", num_classes=3)
    rng = np.random.default_rng(3)
    baseline = build_baseline({"input": rng.random((64, 4), dtype=np.float32)},
                              {"logits": rng.random((64, 3), dtype=np.float32)}, task)
    serving = SimpleNamespace(name="m", version="v2", manifest=SimpleNamespace(
        task=task, field_baseline=baseline, labels=["a", "b", "c"]),
        plan=SimpleNamespace(variant=SimpleNamespace(name="fp32"), target_key="ort-cpu"))
    policy = {"m": CapturePolicy(sample_rate=0.25)}
    capture = FieldCapture(tmp_path / "spool", "dev", lambda: (CaptureSettings(), policy), CaptureMetrics())
    field = FieldStatistics(rate=0.5, min_samples=1)
    capture.start()
    field.start()
    tap = TritonTap(None, lambda: {"m": serving}, capture, field)
    try:
        draws = [(i + 0.5) / 40 for i in range(40)]
        for i, draw in enumerate(draws):
            tap.deliver({"model": "m", "version": "v2", "id": "", "capture": draw, "field": draw},
                        {"input": np.full((1, 4), i, np.float32)}, {"logits": np.eye(1, 3, dtype=np.float32)})
        capture.drain()
        field.stop()
        assert capture.metrics.value("edgeloop_capture_items_total", model="m", policy="sample") == 10  # < 0.25
        assert field.take("m")["samples"] == 20  # < 0.5
        assert tap.delivered == 40
    finally:
        capture.stop()


@pytest.mark.integration
def test_an_imported_models_inputs_and_outputs_come_home_per_request_from_batches_triton_merged(
        tmp_path, triton_python):  # noqa: F811
    """Two inputs (an image, int64 tokens of a dynamic length) and two outputs, concurrent requests merged by Triton's
    dynamic batcher: each captured item holds exactly its own request's tensors, as the client sent and received
    them."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import pandas as pd

    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.report.capture.metrics import CaptureMetrics
    from edge_runtime.report.capture.worker import FieldCapture
    from edge_runtime.serve.triton.dataplane import write_model
    from edgeloop_core.contract.captures import CapturePolicy, CaptureSettings, tensor_array
    from tests.edge_runtime.test_triton import _models, bare_triton

    path = _models(tmp_path)["two_in_two_out"]
    engine = OrtEngine(path, max_batch_size=8, threads=1)
    serving = SimpleNamespace(name="imported", version="v4", manifest=SimpleNamespace(
        task=Task(kind="raw"), field_baseline=None, labels=[]),
        plan=SimpleNamespace(variant=SimpleNamespace(name="fp32"), target_key="ort-cpu"))
    policy = {"imported": CapturePolicy(sample_rate=1.0)}
    capture = FieldCapture(tmp_path / "spool", "dev", lambda: (CaptureSettings(), policy), CaptureMetrics())
    server = bare_triton(tmp_path, triton_python, backend="python")
    server.start()
    tap = TritonTap(server, lambda: {"imported": serving}, capture, None)
    rng = np.random.default_rng(4)
    try:
        capture.start()
        tap.start()
        write_model(server.repo, "imported", 1, engine_path=path, platform=engine.platform, inputs=engine.inputs,
                    outputs=engine.outputs, max_batch_size=8, max_queue_delay_us=5000, edgeloop_version="v4",
                    variant="fp32", backend="python")
        server.load("imported")
        assert tap.publish()["models"]["imported"]["capture"] == 1.0
        requests = {f"r{i}": {"image": rng.standard_normal((b, 1, 4, 4)).astype(np.float32),
                              "tokens": rng.integers(0, 50, (b, 5)).astype(np.int64)}
                    for i, b in enumerate([1, 2, 1, 2, 1, 1, 2, 1, 2, 1, 1, 1])}

        def ask(item: tuple[str, dict]) -> dict:
            request_id, inputs = item
            with triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
                tensors = []
                for key, value in inputs.items():
                    tensor = triton.InferInput(key, list(value.shape), triton.np_to_triton_dtype(value.dtype))
                    tensor.set_data_from_numpy(value)
                    tensors.append(tensor)
                reply = client.infer("imported", tensors, request_id=request_id)
                return {name: reply.as_numpy(name) for name in ("scores", "embedded")}

        with ThreadPoolExecutor(6) as pool:
            received = dict(zip(requests, pool.map(ask, requests.items()), strict=True))
        wait_until(lambda: tap.delivered == len(requests))
        capture.drain()
        capture.roll_due(force=True)
        rows = pd.concat([pd.read_parquet(p) for p in capture.spool.ready() if p.suffix == ".parquet"])
        assert sorted(rows["request_id"]) == sorted(requests)
        assert server.metrics()["imported"]["executions"] < len(requests)  # Triton merged requests
        for row in rows.itertuples():
            given = {t["name"]: t for t in row.inputs}
            for name, sent in requests[row.request_id].items():
                assert given[name]["data"] == sent.tobytes() and list(given[name]["shape"]) == list(sent.shape)
            answered = {t["name"]: tensor_array(t) for t in row.outputs}
            for name, value in received[row.request_id].items():
                np.testing.assert_array_equal(answered[name], value)
            assert row.version == "v4" and row.model == "imported" and row.policy == "sample"
    finally:
        tap.stop()
        capture.stop()
        server.stop()


def test_the_runtimes_own_requests_through_triton_are_never_tapped(tmp_path):
    # the batch sweep and the energy figures run through Triton on the serving model: they are not the field
    from edge_runtime.serve.triton.dataplane import INTERNAL_REQUEST_ID

    (tmp_path / FRAMES.CONFIG).write_text(json.dumps({"models": {"m": {"capture": 1.0, "rules": True,
                                                                         "field": 1.0, "remember": True}}}))
    stub = FRAMES.Tap(str(tmp_path), "m", "v1")
    x = np.ones((1, 4), np.float32)
    try:
        stub.offer(Request(INTERNAL_REQUEST_ID), {"input": x}, {"logits": x})
        assert stub._queue.qsize() == 0 and stub.dropped == {"capture": 0, "field": 0}
        stub.offer(Request("app-1"), {"input": x}, {"logits": x})  # an app's request is taken
        wait_until(lambda: stub.dropped["capture"] == 1, timeout=10)  # taken, then dropped: nobody listens here
    finally:
        stub.close()
