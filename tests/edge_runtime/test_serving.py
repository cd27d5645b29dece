"""The edge runtime end to end on loopback: SeaweedFS → fetch → build (ONNX Runtime) → validate → gRPC, with
tritonclient (from PyPI) as the client."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from edgeloop_core.errors import DigestMismatch, ValidationFailed
from edgeloop_core.protos import inference_pb2 as pb
from edgeloop_core.protos import inference_pb2_grpc
from tests.edge_runtime.conftest import RunningEdge, move_channel, publish_model, wait_until

pytestmark = pytest.mark.integration
MODEL = "digits-cnn"


def triton_predict(client: triton.InferenceServerClient, x: np.ndarray) -> tuple[np.ndarray, str]:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32))
    result = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("logits")])
    return result.as_numpy("logits"), result.get_response().model_version


@pytest.fixture
def served(store, signing_key, trained, edge_settings, request):
    publish_model(store, signing_key, trained, "v1")
    overrides = getattr(request, "param", {})
    edge = RunningEdge(edge_settings(store.bucket, **overrides), store=None)
    edge.wait_ready()
    yield edge, store
    edge.stop()


def test_tritonclient_gets_liveness_metadata_and_correct_predictions(served, trained):
    edge, _ = served
    client = triton.InferenceServerClient(edge.address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_server_metadata()
    assert meta.name == "edgeloop" and "model_repository" in meta.extensions
    model = client.get_model_metadata(MODEL)
    assert model.platform == "onnxruntime_onnx" and list(model.versions) == ["v1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 1, 8, 8])]
    predictions = np.concatenate([triton_predict(client, trained.x_val[i : i + 16])[0].argmax(1)
                                  for i in range(0, len(trained.x_val), 16)])
    assert (predictions == trained.y_val).mean() >= 0.9
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "v1", "READY")]
    assert edge.app.runtime.serving.plan.variant.name == "int8-ort"  # the CPU variant was chosen
    validated = edge.events("validated")[-1]
    assert validated["passed"] and validated["samples"] == len(trained.y_val)


def test_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    edge, _ = served
    with grpc.insecure_channel(edge.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "edgeloop.liveness"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), grpc.StatusCode.INVALID_ARGUMENT, "datatype"),
        (lambda r: r.inputs[0].shape.__setitem__(2, 9), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 7), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "not served"),
        (lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents")), grpc.StatusCode.INVALID_ARGUMENT,
         "no inputs"),
        (lambda r: setattr(r.inputs[0], "name", "pixels"), grpc.StatusCode.INVALID_ARGUMENT, "unknown input"),
        (lambda r: r.outputs.add(name="probabilities"), grpc.StatusCode.INVALID_ARGUMENT, "unknown outputs"),
        (lambda r: setattr(r, "model_version", "v0"), grpc.StatusCode.NOT_FOUND, "version"),
    ],
)
def test_malformed_requests_get_the_right_code_and_the_server_keeps_serving(served, trained, mutate, code, needle):
    edge, _ = served
    x = trained.x_val[:2].astype(np.float32)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    mutate(request)
    with grpc.insecure_channel(edge.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        good = pb.ModelInferRequest(model_name=MODEL)
        good.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        good.raw_input_contents.append(x.tobytes())
        after = stub.ModelInfer(good, timeout=10)
    assert info.value.code() == code
    assert needle in info.value.details()
    assert after.outputs[0].shape == [2, 10]


def test_bytes_that_are_no_request_get_invalid_argument(served):
    """The error mapping wraps each registered handler's decoding too (not a per-call interceptor)."""
    edge, _ = served
    with grpc.insecure_channel(edge.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff not protobuf", timeout=10)
        assert stub_live(channel)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInfer message" in info.value.details()


def stub_live(channel: grpc.Channel) -> bool:
    return inference_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_oversized_and_too_large_batches(served, edge_settings, trained):
    edge, _ = served
    client = triton.InferenceServerClient(edge.address)
    big = np.zeros((257, 1, 8, 8), np.float32)  # more than max_request_batch_size (256)
    with pytest.raises(InferenceServerException) as batch:
        triton_predict(client, big)
    assert "outside 1..256" in str(batch.value) and "INVALID_ARGUMENT" in str(batch.value.status())
    # larger than one engine run (max_batch_size 16): split into runs and rejoined, in order
    logits, _ = triton_predict(client, trained.x_val[:40].astype(np.float32))
    assert logits.shape == (40, 10)
    np.testing.assert_allclose(logits[20:24], triton_predict(client, trained.x_val[20:24])[0], rtol=1e-5, atol=1e-5)
    huge = np.zeros((16, 1, 256, 1024), np.float32)  # 16 MiB of payload: beyond max_message_bytes
    tensor = triton.InferInput("input", list(huge.shape), "FP32")
    tensor.set_data_from_numpy(huge)
    with pytest.raises(InferenceServerException) as oversized:
        client.infer(MODEL, [tensor])
    assert "RESOURCE_EXHAUSTED" in str(oversized.value.status())
    assert triton_predict(client, trained.x_val[:1])[0].shape == (1, 10)


@pytest.mark.parametrize("served", [{"poll_interval_s": 0.3}], indirect=True)
def test_new_version_is_picked_up_and_swapped_in_without_a_failed_request(served, trained, signing_key):
    edge, store = served
    client = triton.InferenceServerClient(edge.address)
    failures, versions, stop = [], [], threading.Event()

    def keep_sending() -> None:
        worker = triton.InferenceServerClient(edge.address)
        i = 0
        while not stop.is_set():
            try:
                _, version = triton_predict(worker, trained.x_val[i % 300 : i % 300 + 4])
                versions.append(version)
            except Exception as exc:  # noqa: BLE001 - counted, asserted below
                failures.append(exc)
            i += 1

    senders = [threading.Thread(target=keep_sending) for _ in range(3)]
    for t in senders:
        t.start()
    try:
        publish_model(store, signing_key, trained, "v2")  # moves the stable channel; the poll loop notices
        wait_until(lambda: edge.app.runtime.serving.version == "v2", timeout=60)
        before = len(versions)
        wait_until(lambda: len(versions) >= before + 30, timeout=30)
    finally:
        stop.set()
        for t in senders:
            t.join(30)
    assert failures == []
    assert versions[0] == "v1" and versions[-1] == "v2" and client.is_server_ready()
    assert edge.events("serving")[-1]["previous"] == "v1"


def test_version_below_its_reference_is_refused_and_the_old_one_keeps_serving(served, trained, signing_key):
    edge, store = served
    publish_model(store, signing_key, trained, "v3-bad", files=trained.untrained)
    with pytest.raises(ValidationFailed) as info:
        edge.call(edge.app.runtime.reconcile())
    assert "below" in str(info.value)
    client = triton.InferenceServerClient(edge.address)
    assert triton_predict(client, trained.x_val[:4])[1] == "v1"
    assert not client.is_server_ready()  # the desired version is not the one serving: the rollout must stop
    failed = edge.events("failed")[-1]
    assert failed["version"] == "v3-bad"
    move_channel(store, signing_key, "v1")
    edge.call(edge.app.runtime.reconcile())
    assert client.is_server_ready()


def test_tampered_file_is_refused(served, trained, signing_key):
    edge, store = served
    publish_model(store, signing_key, trained, "v4")
    store.put_bytes("models/digits-cnn/v4/int8-ort.onnx", trained.untrained["int8-ort"].read_bytes())
    with pytest.raises(DigestMismatch):
        edge.call(edge.app.runtime.reconcile())
    assert edge.app.runtime.serving.version == "v1"
    assert not (edge.app.settings.cache_dir / "artifacts" / MODEL / "v4" / "int8-ort.onnx").exists()


def test_restart_with_a_warm_cache_needs_no_download_or_build(served, edge_settings, trained):
    edge, store = served
    first_fetch = edge.events("fetched")[-1]
    assert first_fetch["bytes"] > 0
    edge.stop()
    again = RunningEdge(edge_settings(store.bucket))
    try:
        again.wait_ready()
        assert again.events("fetched")[-1]["bytes"] == 0
        assert again.events("built")[-1]["built"] is False
        client = triton.InferenceServerClient(again.address)
        assert triton_predict(client, trained.x_val[:2])[1] == "v1"
    finally:
        again.stop()


def test_desired_file_change_rolls_to_the_version_it_names(store, signing_key, trained, edge_settings, tmp_path):
    """Helm mounts the desired model as a file; editing it (a `helm upgrade`) moves the device."""
    import json

    publish_model(store, signing_key, trained, "v1")
    publish_model(store, signing_key, trained, "v2", channel=None)
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"model_name": MODEL, "model_version": "v1"}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, poll_interval_s=3600))
    try:
        edge.wait_ready()
        assert edge.app.runtime.serving.version == "v1"
        desired.write_text(json.dumps({"model_name": MODEL, "model_version": "v2"}))
        wait_until(lambda: edge.app.runtime.serving is not None and edge.app.runtime.serving.version == "v2",
                   timeout=30)
        assert edge.app.runtime.ready()
    finally:
        edge.stop()


def test_anonymous_load_and_unload_are_refused(served):
    edge, _ = served  # repository control is off by default
    client = triton.InferenceServerClient(edge.address)
    for call in (client.unload_model, client.load_model):
        with pytest.raises(InferenceServerException) as info:
            call(MODEL)
        assert "StatusCode.PERMISSION_DENIED" in str(info.value.status())
    assert client.is_model_ready(MODEL) and client.is_server_ready()


@pytest.mark.parametrize("served", [{"repository_control": True, "control_token": "ctl-token"}], indirect=True)
def test_repository_extension_unload_and_load_with_the_control_token(served):
    edge, _ = served
    client = triton.InferenceServerClient(edge.address)
    for headers in (None, {"authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as info:
            client.unload_model(MODEL, headers=headers)
        assert "StatusCode.UNAUTHENTICATED" in str(info.value.status())
    assert client.is_model_ready(MODEL)
    control = {"authorization": "Bearer ctl-token"}
    client.unload_model(MODEL, headers=control)
    assert not client.is_model_ready(MODEL)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata(MODEL)
    assert "StatusCode.UNAVAILABLE" in str(info.value.status())
    client.load_model(MODEL, headers=control)
    assert client.is_model_ready(MODEL) and client.is_server_ready()


def test_identical_devices_share_an_engine(store, signing_key, trained, edge_settings, tmp_path):
    publish_model(store, signing_key, trained, "v1")
    from edgeloop_core.contract import generate_signing_key

    fleet, _ = generate_signing_key(tmp_path / "fleet")  # the fleet build key: devices sign what they share
    sharing = {"share_engines": True, "engine_signing_key_file": fleet,
               "engine_verify_key_file": tmp_path / "fleet" / "verify-key.pem"}
    first = RunningEdge(edge_settings(store.bucket, cache_dir=tmp_path / "a", **sharing))
    try:
        first.wait_ready()
        assert first.events("built")[-1]["source"] == "built"
        plan = first.app.runtime.serving.plan  # read while it serves: after stop() nothing does
    finally:
        first.stop()
    target = str(plan.target_key)
    assert first.app.runtime.status()["target_key"] is None  # (why the key is read above, not here)
    keys = set(store.list_keys("models/digits-cnn/v1/engines/"))
    # the engine and its signed record, under the target key of the device that built it
    assert {f"models/digits-cnn/v1/engines/{target}/{plan.engine_file}",
            f"models/digits-cnn/v1/engines/{target}/{plan.record_file}"} <= keys, (target, keys)
    second = RunningEdge(edge_settings(store.bucket, cache_dir=tmp_path / "b", device_id="jetson-2", **sharing))
    try:
        second.wait_ready()
        assert second.events("built")[-1]["source"] == "shared"
        assert second.events("validated")[-1]["passed"]  # a shared engine is still validated before serving
    finally:
        second.stop()


def test_an_object_planted_under_the_channel_name_cannot_freeze_the_channel(served, trained, signing_key):
    """A bucket writer without the model key plants ``models/<model>/stable/manifest.json`` — junk, or a genuinely
    signed manifest of the version serving now — hoping the device takes "stable" for a version and ignores the
    signed pointer. The signed pointer wins: the device moves to the version it names."""
    edge, store = served
    genuine = store.get_bytes("models/digits-cnn/v1/manifest.json")
    for planted in (b"{}", genuine):
        store.put_bytes("models/digits-cnn/stable/manifest.json", planted)
        version = f"v-planted-{len(planted)}"
        publish_model(store, signing_key, trained, version)  # moves stable, signed, to the new version
        edge.call(edge.app.runtime.reconcile())
        assert edge.app.runtime.serving.version == version
