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
        # Ready stays true: the last good version serves, and a pointer anyone with bucket write access can plant
        # must not take every device of a fleet out of its Services (nor stall a rollout it is not part of)
        assert edge.app.runtime.ready(), f"not ready after {label}"
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


def _shared_engine(store, signing_key, trained, edge_settings, tmp_path):
    """v1 served by a first device that shares its engine under the fleet build key; returns what a second,
    identical device needs: its sharing settings, the fleet signing key, the plan and the record's S3 keys."""
    fleet, _ = generate_signing_key(tmp_path / "fleet")
    sharing = {"share_engines": True, "engine_signing_key_file": fleet,
               "engine_verify_key_file": tmp_path / "fleet" / "verify-key.pem"}
    publish_model(store, signing_key, trained, "v1")
    first = RunningEdge(edge_settings(store.bucket, cache_dir=tmp_path / "a", **sharing), store=store)
    try:
        first.wait_ready()
        plan = first.app.runtime.serving.plan
    finally:
        first.stop()
    layout = ArtifactLayout()
    record_key = layout.engine_key(MODEL, "v1", str(plan.target_key), plan.record_file)
    engine_key = layout.engine_key(MODEL, "v1", str(plan.target_key), plan.engine_file)
    return sharing, load_signing_key(fleet), plan, record_key, engine_key


def _plant(store, record_key, engine_key, engine_bytes, fleet_key, **changes) -> None:
    """Replace the shared engine and its record with ``engine_bytes`` and a record changed by ``changes``, signed
    with the fleet build key the devices trust."""
    from edge_runtime.build.engines.provider import SharedEngineRecord
    from edgeloop_core.contract import sha256_bytes
    from edgeloop_core.contract.signing import make_signature

    record = SharedEngineRecord.model_validate_json(store.get_bytes(record_key))
    planted = record.model_copy(update={"sha256": sha256_bytes(engine_bytes), "size_bytes": len(engine_bytes),
                                        "signature": None, **changes})
    planted = planted.model_copy(update={"signature": make_signature(fleet_key, planted.canonical_bytes())})
    store.put_bytes(engine_key, engine_bytes)
    store.put_bytes(record_key, planted.model_dump_json().encode())


def test_a_shared_engine_for_another_target_is_refused_and_built_locally(store, signing_key, trained, edge_settings,
                                                                        tmp_path):
    sharing, fleet_key, plan, record_key, engine_key = _shared_engine(store, signing_key, trained, edge_settings,
                                                                      tmp_path)
    # signed by the trusted fleet key, but for another device's target, copied under this target's key
    other_target = f"{plan.target_key}-elsewhere"
    _plant(store, record_key, engine_key, store.get_bytes(engine_key), fleet_key, target_key=other_target)
    second = RunningEdge(edge_settings(store.bucket, cache_dir=tmp_path / "b", device_id="jetson-2", **sharing),
                         store=store)
    try:
        second.wait_ready()
        built = second.events("built")[-1]
        assert built["source"] == "built"
        assert any("shared engine refused" in n and other_target in n for n in built["notes"]), built["notes"]
        assert second.events("validated")[-1]["passed"]
    finally:
        second.stop()


def test_an_engine_from_elsewhere_that_fails_validation_is_quarantined_and_rebuilt_here(store, signing_key, trained,
                                                                                       edge_settings, tmp_path):
    sharing, fleet_key, plan, record_key, engine_key = _shared_engine(store, signing_key, trained, edge_settings,
                                                                      tmp_path)
    # a device the fleet trusts shares a broken engine (an untrained model): signed, loads, answers wrongly
    _plant(store, record_key, engine_key, trained.untrained[plan.variant.name].read_bytes(), fleet_key)
    settings = edge_settings(store.bucket, cache_dir=tmp_path / "b", device_id="jetson-2", **sharing)
    second = RunningEdge(settings, store=store)
    try:
        second.wait_ready()
        validated = [(e["source"], e["passed"]) for e in second.events("validated")]
        assert validated == [("shared", False), ("built", True)]  # validated again before the version is blamed
        assert [e["source"] for e in second.events("built")] == ["shared", "built"]
        (reason,) = (settings.cache_dir / "quarantine").glob("*.reason")
        assert "shared engine failed validation" in reason.read_text()
        assert second.app.runtime.serving.version == "v1" and not second.events("failed")
    finally:
        second.stop()


def test_a_disk_that_refuses_a_download_is_cache_full_and_the_old_version_serves(running, signing_key, trained):
    edge, store = running
    runtime = edge.app.runtime
    manifest = publish_model(store, signing_key, trained, "v2")
    folder = edge.app.settings.cache_dir / "artifacts" / MODEL / "v2"
    folder.mkdir(parents=True)
    # every file of v2 is written where the kernel answers each write with ENOSPC, as a full disk does
    parts = [folder / f"{ref.file}.part" for ref in [*manifest.variants, manifest.validation]]
    for part in parts:
        part.symlink_to("/dev/full")
    runtime.wake()
    wait_until(lambda: edge.events("failed") and "no space left" in _last_failure(edge), timeout=15)
    assert edge.events("failed")[-1]["error_kind"] == "CacheFull"
    assert runtime.serving.version == "v1" and edge.app.alive()
    for part in parts:  # space is freed: the loop's next retry succeeds, no restart
        part.unlink()
    wait_until(lambda: runtime.serving.version == "v2" and runtime.ready(), timeout=30)


def test_stats_the_outbox_drops_while_the_hub_is_down_are_counted_in_stats(store, signing_key, trained,
                                                                          edge_settings):
    from tests.edge_runtime.conftest import free_port

    publish_model(store, signing_key, trained, "v1")
    # a hub nobody answers at, a small outbox and a stats event every 20 ms: the outbox fills within seconds
    edge = RunningEdge(edge_settings(store.bucket, hub_address=f"127.0.0.1:{free_port()}", hub_token="tok",
                                     outbox_max_events=100, telemetry_interval_s=0.02), store=store)
    try:
        edge.wait_ready()
        wait_until(lambda: edge.app.outbox.dropped() > 0, timeout=30)
        wait_until(lambda: any(e["telemetry_dropped"] > 0 for e in edge.events("stats")), timeout=10)
        assert edge.app.sender.failures > 0 and edge.app.outbox.count() <= 100 + 1
        kinds = [e.kind for e in edge.app.outbox.pending(10_000)]
        for kind in ("facts", "fetched", "built", "validated", "serving"):  # state changes are never dropped
            assert kind in kinds, kind
    finally:
        edge.stop()


def test_an_outbox_on_a_full_disk_is_logged_and_counted_and_serving_goes_on(store, signing_key, trained,
                                                                           edge_settings, caplog):
    import tritonclient.grpc as triton

    from tests.edge_runtime.test_serving import triton_predict

    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, telemetry_interval_s=0.05, retry_initial_s=0.1, retry_max_s=0.3),
                       store=store)
    outbox = edge.app.outbox
    try:
        edge.wait_ready()
        # the outbox's file may not grow any more: SQLite answers every write with SQLITE_FULL ("database or disk
        # is full"), the error a full disk gives it
        with outbox._lock:
            pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
            outbox._db.execute(f"PRAGMA max_page_count = {pages}")
        wait_until(lambda: edge.app.telemetry_errors > 0, timeout=15)
        assert any("could not queue" in r.getMessage() and "full" in r.getMessage() for r in caplog.records)
        publish_model(store, signing_key, trained, "v2")  # reconciling goes on
        edge.app.runtime.wake()
        wait_until(lambda: edge.app.runtime.serving.version == "v2" and edge.app.runtime.ready(), timeout=30)
        assert triton_predict(triton.InferenceServerClient(edge.address), trained.x_val[:2])[1] == "v2"  # serving
        assert edge.app.alive() and edge.app.stats()["telemetry_errors"] == edge.app.telemetry_errors
        assert not [e for e in edge.events("serving") if e["version"] == "v2"]  # the event itself is lost
        with outbox._lock:  # space is freed: the next stats event says how many events were lost
            outbox._db.execute("PRAGMA max_page_count = 1073741823")
        wait_until(lambda: any(e["telemetry_errors"] > 0 for e in edge.events("stats")), timeout=10)
    finally:
        edge.stop()


def test_a_process_killed_mid_write_leaves_the_old_file_and_start_up_sweeps_the_rest(store, signing_key, trained,
                                                                                      edge_settings, tmp_path):
    import signal
    import subprocess
    import sys

    publish_model(store, signing_key, trained, "v1")
    settings = edge_settings(store.bucket)
    first = RunningEdge(settings, store=store)
    first.wait_ready()
    first.stop()
    state = settings.cache_dir / "state.json"
    before = state.read_bytes()
    # a real process killed (SIGKILL) halfway through writing state.json the one way edgeloop writes files
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from edgeloop_core.files import atomic_output\n"
        "with atomic_output(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_bytes(b'{\"models\": {\"half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(state)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert state.read_bytes() == before  # the old file, whole
    (left,) = settings.cache_dir.glob(".state.json.*.tmp")
    engine_dir = next((settings.cache_dir / "engines").rglob("*.record.json")).parent
    build = engine_dir / ".build-fp32.plan"  # a build an older runtime was killed in
    build.write_bytes(b"half an engine")
    part = settings.cache_dir / "artifacts" / MODEL / "v1" / "next.onnx.part"
    part.write_bytes(b"the first MiB of a download")
    again = RunningEdge(settings, store=store)
    try:
        assert not left.exists() and not build.exists()  # swept at start, before anything writes
        assert part.exists()  # a partial download resumes, it is not swept
        again.wait_ready()
        assert again.events("built")[-1]["source"] == "cache"
    finally:
        again.stop()
