"""Failures the edge must ride out: S3 going away mid-download, the hub going away, metrics while serving."""

from __future__ import annotations

import os
import threading
import time
import urllib.request

import pytest

from edge_runtime.fetch.cache import download_resumable
from edgeloop.local_s3 import LocalS3
from edgeloop_core.contract import FileRef, sha256_file
from edgeloop_core.errors import StoreUnavailable
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until

pytestmark = pytest.mark.integration


def test_s3_stopped_during_a_download_then_restarted_ends_in_a_verified_artifact(tmp_path, caplog):
    s3 = LocalS3(tmp_path / "s3").start()
    try:
        store = s3.store("resume")
        blob = tmp_path / "engine.bin"
        blob.write_bytes(os.urandom(24 << 20))
        digest, size = sha256_file(blob)
        store.put_file("models/m/v1/engine.bin", blob)
        ref = FileRef(file="engine.bin", sha256=digest, size_bytes=size)
        written, outage = [], threading.Event()

        def on_chunk(n: int) -> None:
            written.append(n)
            if not outage.is_set():  # after the first MiB: S3 goes away, and comes back 2 s later
                outage.set()
                s3.stop()
                threading.Timer(2.0, s3.start).start()

        dest = tmp_path / "cache" / "engine.bin"
        download_resumable(store, "models/m/v1/engine.bin", dest, ref, attempts=10, backoff_s=0.5,
                           on_chunk=on_chunk)
        assert sha256_file(dest) == (digest, size)
        assert not dest.with_name("engine.bin.part").exists()
        assert outage.is_set() and sum(written) == size  # resumed: no byte was fetched twice
        retries = [r for r in caplog.records if "retrying" in r.getMessage()]
        assert retries, "the outage did not interrupt the download"
    finally:
        s3.stop()


def test_download_gives_up_with_a_clear_error_and_keeps_the_partial_file(tmp_path):
    s3 = LocalS3(tmp_path / "s3").start()
    store = s3.store("gone")
    blob = tmp_path / "f.bin"
    blob.write_bytes(os.urandom(6 << 20))
    digest, size = sha256_file(blob)
    store.put_file("k", blob)
    store.client.meta.config.retries = {"max_attempts": 1}

    dest = tmp_path / "out" / "f.bin"
    dest.parent.mkdir()
    dest.with_name("f.bin.part").write_bytes(blob.read_bytes()[: 1 << 20])  # an earlier attempt got 1 MiB
    s3.stop()
    with pytest.raises(StoreUnavailable) as info:
        download_resumable(store, "k", dest, FileRef(file="f.bin", sha256=digest, size_bytes=size), attempts=2,
                           backoff_s=0.1)
    assert "partial file is kept" in str(info.value)
    assert not dest.exists() and dest.with_name("f.bin.part").stat().st_size == 1 << 20


def test_runtime_telemetry_survives_a_hub_outage(store, signing_key, trained, edge_settings, tmp_path):
    """A full runtime reports through the outbox; the hub is stopped, the device keeps working (a new version
    swaps in), the hub comes back, and it holds every event the device wrote — each once."""
    import asyncio

    from telemetry_hub.server import HubSettings, start_hub

    loop = asyncio.new_event_loop()
    hub_thread = threading.Thread(target=loop.run_forever, daemon=True)
    hub_thread.start()

    def on_hub_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    hub_settings = HubSettings(database_url=f"sqlite:///{tmp_path / 'hub.sqlite'}", port=0, tokens="test-jetson:tok")
    server, port, hub_store = on_hub_loop(start_hub(hub_settings))
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, hub_address=f"127.0.0.1:{port}", hub_token="tok",
                                     telemetry_interval_s=0.3))
    written: list[str] = []
    add = edge.app.outbox.add
    edge.app.outbox.add = lambda kind, payload: written.append(add(kind, payload)) or written[-1]
    try:
        edge.wait_ready()
        wait_until(lambda: hub_store.count_events("test-jetson") >= 4 and edge.app.outbox.count() == 0)
        before_outage = hub_store.count_events("test-jetson")
        on_hub_loop(server.stop(0))
        publish_model(store, signing_key, trained, "v2")
        edge.call(edge.app.runtime.reconcile())
        time.sleep(1.0)  # stats events pile up, sends fail and back off
        assert edge.app.outbox.count() > 0
        server, _, hub_store = on_hub_loop(start_hub(hub_settings.model_copy(update={"port": port})))
        wait_until(lambda: edge.app.outbox.count() == 0, timeout=60)
        edge.app.outbox.add = add
        from sqlalchemy import select

        from telemetry_hub.store import events, stats

        with hub_store.engine.connect() as conn:  # state changes and stats, each in its own table
            at_hub = [i for table in (events, stats) for i in conn.execute(
                select(table.c.id).where(table.c.device_id == "test-jetson")).scalars()]
        assert len(at_hub) == len(set(at_hub)) > before_outage
        assert set(written) <= set(at_hub)  # every event written after start-up arrived, once
        assert len(set(at_hub) - set(written)) == 1  # and the "facts" event start() wrote before we counted
        (device,) = hub_store.fleet()
        assert (device["serving_version"], device["device_id"]) == ("v2", "test-jetson")
        assert device["validation_result"].startswith("passed")
    finally:
        edge.stop()
        on_hub_loop(server.stop(0))
        loop.call_soon_threadsafe(loop.stop)


def test_metrics_are_scraped_while_serving(store, signing_key, trained, edge_settings):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, metrics_port=port))
    try:
        edge.wait_ready()
        import tritonclient.grpc as triton

        from tests.edge_runtime.test_serving import triton_predict

        client = triton.InferenceServerClient(edge.address)
        for _ in range(3):
            triton_predict(client, trained.x_val[:2])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'edgeloop_requests_total{code="OK",model="digits-cnn"} 3.0' in body
        assert "edgeloop_ready 1.0" in body
        assert 'edgeloop_model_state{model="digits-cnn",state="serving"} 1.0' in body
        assert 'edgeloop_model_ready{model="digits-cnn"} 1.0' in body
        assert 'edgeloop_batch_size_count{model="digits-cnn"}' in body
    finally:
        edge.stop()


def test_a_loop_woken_as_it_is_cancelled_still_ends(tmp_path):
    """Before Python 3.12 ``asyncio.wait_for(event.wait(), t)`` swallows a cancellation that arrives while the event
    is being set (python/cpython#86296); the runtime's loops that wait for wake-ups (telemetry sender, model loop,
    batcher) wait through :func:`wait_event` instead, so cancelling them always ends them."""
    import asyncio

    from edge_runtime.aio import wait_event
    from edge_runtime.report.telemetry import Outbox, TelemetrySender

    async def scenario() -> tuple[bool, bool, bool, bool]:
        event = asyncio.Event()
        timed_out = not await wait_event(event, 0.01)
        event.set()
        already_set = await wait_event(event, 10)
        event.clear()

        async def waits_forever() -> None:
            while True:
                await wait_event(event, 10)
                event.clear()

        loop = asyncio.ensure_future(waits_forever())
        await asyncio.sleep(0.01)
        event.set()  # woken and cancelled in the same turn of the event loop
        loop.cancel()
        loop_ended = bool((await asyncio.wait({loop}, timeout=2))[0])

        # the runtime's telemetry sender, with no hub to send to: nothing pending, so it waits for a wake-up
        sender = TelemetrySender(Outbox(tmp_path / "outbox.sqlite", "dev-1"), "127.0.0.1:9", None, interval_s=30)
        task = asyncio.ensure_future(sender.run_forever())
        await asyncio.sleep(0.2)
        sender.wake()
        task.cancel()
        sender_ended = bool((await asyncio.wait({task}, timeout=2))[0])
        for t in (loop, task):
            t.cancel()
        await sender.close()
        return timed_out, already_set, loop_ended, sender_ended

    assert asyncio.run(scenario()) == (True, True, True, True)
