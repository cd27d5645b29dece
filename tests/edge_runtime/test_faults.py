"""Faults a fleet meets, against the real runtime and SeaweedFS: malformed or replayed channel pointers, a full
cache, corrupted and forged engines, a hung S3 endpoint, exceptions that are not ours, unparseable requests.
In each the device keeps serving its last good version, says why, and recovers by itself."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import timedelta

import grpc
import pytest

from edgeloop_core.contract import ArtifactLayout, ChannelPointer, generate_signing_key, load_signing_key, sign_pointer
from tests.edge_runtime.conftest import RunningEdge, move_channel, publish_model, wait_until

pytestmark = pytest.mark.integration

MODEL = "digits-cnn"
CHANNEL_KEY = ArtifactLayout().channel_key(MODEL, "stable")


@pytest.fixture
def running(store, signing_key, trained, edge_settings):
    """v1 published and served; the loop runs with fast retries."""
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, retry_initial_s=0.1, retry_max_s=0.3), store=store)
    edge.wait_ready()
    yield edge, store
    edge.stop()


def _last_failure(edge) -> str:
    return edge.events("failed")[-1]["error"]


def test_malformed_replayed_and_unsigned_channel_pointers_never_stop_the_device(running, signing_key, trained,
                                                                               tmp_path):
    edge, store = running
    seen = json.loads(store.get_bytes(CHANNEL_KEY))["sequence"]
    stranger = load_signing_key(generate_signing_key(tmp_path / "stranger")[0])
    unsigned = ChannelPointer(name=MODEL, channel="stable", version="v1", sequence=seen + 5,
                              expires=sign_pointer(MODEL, "stable", "v1", 1, signing_key).expires)
    bad = {
        "{}": (b"{}", "invalid at name"),
        "[]": (b"[]", "not a JSON object"),
        "null": (b"null", "not a JSON object"),
        "a number": (b"42", "not a JSON object"),
        "not JSON": (b"{nope", "not valid JSON"),
        "traversal": (json.dumps({**json.loads(store.get_bytes(CHANNEL_KEY)), "version": "../other/v-x"}).encode(),
                      "invalid at version"),
        "another model's pointer": (sign_pointer("other-model", "stable", "v1", seen + 1, signing_key)
                                    .model_dump_json().encode(), "describes channel"),
        "lower sequence": (sign_pointer(MODEL, "stable", "v1", seen - 1, signing_key).model_dump_json().encode(),
                           "lower than"),
        "expired": (sign_pointer(MODEL, "stable", "v1", seen + 1, signing_key, ttl=timedelta(seconds=-1))
                    .model_dump_json().encode(), "expired"),
        "unsigned": (unsigned.model_dump_json().encode(), "not signed"),
        "untrusted key": (sign_pointer(MODEL, "stable", "v1", seen + 2, stranger).model_dump_json().encode(),
                          "not trusted"),
    }
    for label, (data, reason) in bad.items():
        store.put_bytes(CHANNEL_KEY, data)
        edge.app.runtime.wake()
        wait_until(lambda reason=reason: edge.events("failed") and reason in _last_failure(edge), timeout=10)
        assert edge.app.runtime.serving.version == "v1", label
        assert edge.app.alive(), f"the loop died on {label}"
    failures = edge.events("failed")
    assert all(f["serving_version"] == "v1" for f in failures)
    # the next valid pointer is picked up by the loop itself
    publish_model(store, signing_key, trained, "v2")
    wait_until(lambda: edge.app.runtime.serving.version == "v2" and edge.app.runtime.ready(), timeout=30)
    assert edge.app.runtime.state == "serving"


def test_a_full_cache_is_reported_keeps_the_old_version_and_recovers_when_space_is_freed(running, signing_key,
                                                                                      trained):
    edge, store = running
    runtime = edge.app.runtime
    cache_root = edge.app.settings.cache_dir
    other = cache_root / "other-data.bin"  # something else filled the device's cache folder
    other.write_bytes(b"\0" * (2 << 20))
    runtime.cache.max_bytes = runtime.cache.size_bytes() + 64 * 1024  # the new version cannot fit
    publish_model(store, signing_key, trained, "v2")
    runtime.wake()
    wait_until(lambda: edge.events("failed") and "EDGE_CACHE_MAX_BYTES" in _last_failure(edge), timeout=10)
    assert edge.events("failed")[-1]["error_kind"] == "CacheFull"
    assert runtime.serving.version == "v1" and not runtime.ready() and edge.app.alive()
    assert not (cache_root / "artifacts" / MODEL / "v2").exists()  # nothing half-downloaded
    other.unlink()  # space is freed: the loop's next retry succeeds, no restart
    wait_until(lambda: runtime.serving.version == "v2" and runtime.ready(), timeout=30)


def test_an_exception_that_is_not_ours_is_reported_and_the_loop_goes_on(running, signing_key, trained):
    edge, store = running
    runtime = edge.app.runtime
    real_exists = runtime.store.exists
    calls = []

    def broken(key):  # a library bug in the middle of a cycle (fault injection around the real store)
        calls.append(key)
        raise RuntimeError("boom in a dependency")

    runtime.store.exists = broken
    try:
        runtime.wake()
        wait_until(lambda: edge.events("failed") and "RuntimeError: boom" in _last_failure(edge), timeout=10)
        time.sleep(0.5)
        assert len(calls) >= 2 and edge.app.alive()  # retried with back-off, not dead
        assert runtime.serving.version == "v1"
    finally:
        runtime.store.exists = real_exists
    publish_model(store, signing_key, trained, "v2")
    runtime.wake()  # (the next poll would find it too; the test does not wait an interval)
    wait_until(lambda: runtime.serving.version == "v2", timeout=30)


def _engine_file(edge):
    runtime = edge.app.runtime
    return runtime.engines.path(runtime.serving.manifest, runtime.serving.plan)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cached_engine_is_quarantined_and_rebuilt(store, signing_key, trained, edge_settings, damage):
    publish_model(store, signing_key, trained, "v1")
    settings = edge_settings(store.bucket)
    edge = RunningEdge(settings, store=store)
    edge.wait_ready()
    engine = _engine_file(edge)
    edge.stop()
    data = bytearray(engine.read_bytes())
    if damage == "truncate":
        engine.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        engine.write_bytes(bytes(data))
    again = RunningEdge(settings, store=store)
    try:
        again.wait_ready()
        built = again.events("built")[-1]
        assert built["source"] == "built" and "set aside" in built["notes"][0]
        quarantined = list((settings.cache_dir / "quarantine").glob("*.reason"))
        assert quarantined and "sha256" in quarantined[0].read_text()
        assert again.events("validated")[-1]["passed"]
    finally:
        again.stop()


def test_a_forged_shared_engine_is_refused_and_built_locally(store, signing_key, trained, edge_settings, tmp_path):
    fleet, _ = generate_signing_key(tmp_path / "fleet")
    sharing = {"share_engines": True, "engine_signing_key_file": fleet,
               "engine_verify_key_file": tmp_path / "fleet" / "verify-key.pem"}
    publish_model(store, signing_key, trained, "v1")
    first = RunningEdge(edge_settings(store.bucket, cache_dir=tmp_path / "a", **sharing), store=store)
    first.wait_ready()
    target = first.app.runtime.serving.plan
    first.stop()
    layout = ArtifactLayout()
    record_key = layout.engine_key(MODEL, "v1", str(target.target_key), target.record_file)
    engine_key = layout.engine_key(MODEL, "v1", str(target.target_key), target.engine_file)
    # any device with write access plants its own engine, with a record re-signed by a key the fleet does not trust
    forged = trained.untrained["int8-ort"].read_bytes()
    from edge_runtime.build.engines.provider import SharedEngineRecord
    from edgeloop_core.contract import sha256_bytes

    record = SharedEngineRecord.model_validate_json(store.get_bytes(record_key))
    rogue = load_signing_key(generate_signing_key(tmp_path / "rogue")[0])
    from edgeloop_core.contract.signing import make_signature

    planted = record.model_copy(update={"sha256": sha256_bytes(forged), "size_bytes": len(forged), "signature": None})
    planted = planted.model_copy(update={"signature": make_signature(rogue, planted.canonical_bytes())})
    store.put_bytes(engine_key, forged)
    store.put_bytes(record_key, planted.model_dump_json().encode())
    second = RunningEdge(edge_settings(store.bucket, cache_dir=tmp_path / "b", device_id="jetson-2", **sharing),
                         store=store)
    try:
        second.wait_ready()
        built = second.events("built")[-1]
        assert built["source"] == "built" and any("not trusted" in n for n in built["notes"])
        assert second.events("validated")[-1]["passed"]
    finally:
        second.stop()


class HungEndpoint:
    """A loopback socket that accepts connections and never answers (an S3 endpoint that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        for conn in self.held:
            conn.close()
        self.sock.close()


def test_a_hung_s3_endpoint_still_lets_a_warm_device_serve_within_15_seconds(store, signing_key, trained,
                                                                            edge_settings):
    publish_model(store, signing_key, trained, "v1")
    warm = RunningEdge(edge_settings(store.bucket), store=store)
    warm.wait_ready()
    warm.stop()
    hung = HungEndpoint()
    try:
        started = time.monotonic()
        edge = RunningEdge(edge_settings(store.bucket, s3_endpoint_url=f"http://127.0.0.1:{hung.port}"))
        try:
            edge.wait_ready(15)
            assert time.monotonic() - started < 15
            assert edge.app.runtime.serving.version == "v1"
            wait_until(lambda: edge.events("failed"), timeout=30)  # S3 itself is reported as failing
            assert "127.0.0.1" in _last_failure(edge) and edge.app.runtime.ready()
        finally:
            edge.stop()
    finally:
        hung.close()


def test_a_cold_start_without_s3_says_why(store, edge_settings):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    edge = RunningEdge(edge_settings(store.bucket, s3_endpoint_url=f"http://127.0.0.1:{port}"))
    try:
        wait_until(lambda: edge.events("failed"), timeout=20)
        error = edge.events("failed")[-1]["error"]
        assert error and f"127.0.0.1:{port}" in error
        assert not edge.app.runtime.ready() and edge.app.alive()
    finally:
        edge.stop()


def test_an_unparseable_request_is_invalid_argument_without_internals(running):
    edge, _ = running
    with grpc.insecure_channel(edge.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff not protobuf", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DecodeError" not in info.value.details() and "ModelInfer" in info.value.details()


def test_a_wedged_loop_turns_liveness_off(running):
    edge, _ = running
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    runtime, shared = edge.app.runtime, edge.app.repository.shared
    shared.settings = shared.settings.model_copy(update={"liveness_timeout_s": 0.5})
    runtime._heartbeat -= 10  # as if the loop had been stuck in a build for a while
    with grpc.insecure_channel(edge.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert not edge.app.alive()
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service="edgeloop.liveness")).status
                   == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)


def test_move_channel_refuses_an_incomplete_version(store, signing_key):
    from edgeloop_core.errors import ObjectNotFound

    with pytest.raises(ObjectNotFound):
        move_channel(store, signing_key, "v-missing")
