"""A restart whose telemetry outbox sits on a full disk, and liveness during a slow download, against the real
runtime, real SQLite and SeaweedFS (behind a throttling TCP proxy on loopback for the slow link)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def outbox_on_a_full_disk(outbox: Path, where: Path):
    """Move the (closed) outbox onto a disk that refuses to grow it, linked from where the runtime looks: a 1 MiB
    tmpfs filled to the last byte when this process may mount one (root), else a folder it may not write in. Yields
    a function that frees the space."""
    where.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode == 0
    target = where / outbox.name
    shutil.move(outbox, target)  # closed cleanly by the first run: no -wal or -shm file is left beside it
    outbox.symlink_to(target)
    filler = where / "filler"
    if mounted:
        with contextlib.suppress(OSError), open(filler, "wb") as fh:  # ENOSPC ends it: the disk is full
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    else:
        where.chmod(0o500)

    def free() -> None:
        if mounted:
            filler.unlink(missing_ok=True)
        else:
            where.chmod(0o700)

    try:
        yield free
    finally:
        free()
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_restart_whose_outbox_cannot_be_opened_serves_the_cached_version_and_opens_it_later(
        store, signing_key, trained, edge_settings, tmp_path, caplog):
    import tritonclient.grpc as triton

    from tests.edge_runtime.test_serving import triton_predict

    publish_model(store, signing_key, trained, "v1")
    settings = edge_settings(store.bucket, retry_initial_s=0.1, retry_max_s=0.3)
    first = RunningEdge(settings, store=store)  # v1 validated and cached
    first.wait_ready()
    first.stop()
    with outbox_on_a_full_disk(settings.cache_dir / "telemetry-outbox.sqlite", tmp_path / "tiny") as free_space:
        second = RunningEdge(settings, store=store)  # today: ConfigError "cannot open the telemetry outbox …"
        try:
            second.wait_ready()
            assert triton_predict(triton.InferenceServerClient(second.address), trained.x_val[:2])[1] == "v1"
            app = second.app
            assert app.outbox is None and "telemetry outbox" in app.outbox_error and app.alive()
            assert app.telemetry_errors > 0  # the facts and state events so far are lost, and counted
            said = [r.getMessage() for r in caplog.records if "serving goes on without telemetry" in r.getMessage()]
            assert len(said) == 1  # logged once, not at every event or retry
            time.sleep(1.0)  # several retries fail meanwhile
            assert app.outbox is None and len([r for r in caplog.records
                                               if "serving goes on without telemetry" in r.getMessage()]) == 1
            free_space()
            wait_until(lambda: app.outbox is not None, timeout=10)  # retried in the background: it opens
            assert second.events("outbox_opened")[0]["events_lost"] > 0
            assert second.events("facts") and not app.outbox_error
            assert any("telemetry outbox opened" in r.getMessage() for r in caplog.records)
            assert triton_predict(triton.InferenceServerClient(second.address), trained.x_val[:2])[1] == "v1"
        finally:
            second.stop()


class ThrottledProxy:
    """A TCP proxy on loopback in front of an S3 endpoint: requests pass as they come, answers come back in
    ``piece_bytes`` every ``every_s`` seconds (a slow link); while ``stall`` is set no answer byte passes."""

    def __init__(self, upstream_url: str, *, piece_bytes: int = 8192, every_s: float = 0.0625) -> None:
        upstream = urlparse(upstream_url)
        self.upstream = (upstream.hostname, upstream.port)
        self.piece_bytes, self.every_s = piece_bytes, every_s
        self.stall = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:  # the endpoint is down: so is this connection
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while data := src.recv(self.piece_bytes if throttled else 1 << 16):
                if throttled:
                    while self.stall.is_set():
                        time.sleep(0.02)
                    time.sleep(self.every_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self.server.close()


def _sample_liveness(edge: RunningEdge, until, timeout: float) -> list[tuple[float, bool, str]]:
    """(time, alive, state) every 50 ms until ``until()`` holds; fails after ``timeout`` seconds."""
    samples, deadline = [], time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"not done within {timeout}s: {edge.app.repository.status()}"
        samples.append((time.monotonic(), edge.app.alive(), str(edge.app.runtime.state)))
        time.sleep(0.05)
    return samples


def test_a_slow_download_counts_as_life_and_a_stalled_one_does_not(store, signing_key, trained, edge_settings,
                                                                    local_s3):
    # a validation set sixteen times the usual (~1.4 MiB) through a 128 KiB/s link: the download takes ~11 s, over
    # five liveness timeouts of 2 s
    big = dataclasses.replace(trained, x_val=np.concatenate([trained.x_val] * 16),
                              y_val=np.concatenate([trained.y_val] * 16))
    publish_model(store, signing_key, big, "v1", files={"fp32": trained.good["fp32"]})
    proxy = ThrottledProxy(local_s3.endpoint_url)
    edge = RunningEdge(edge_settings(store.bucket, s3_endpoint_url=proxy.url, liveness_timeout_s=2.0,
                                     s3_read_timeout_s=30.0))  # its own S3 client, through the proxy
    try:
        fetching = lambda: edge.app.runtime.state == "fetching"  # noqa: E731
        wait_until(fetching, timeout=30)
        samples_start = time.monotonic()
        samples = _sample_liveness(edge, lambda: not fetching() or time.monotonic() - samples_start > 5.0, 60)
        assert time.monotonic() - samples_start > 4.0, "the download ended too soon to prove anything"
        assert all(alive for _, alive, _ in samples), "liveness failed while bytes were arriving"
        # no byte arrives any more: past the timeout the loop is wedged, and liveness says so
        proxy.stall.set()
        stalled_at = time.monotonic()
        wait_until(lambda: not edge.app.alive(), timeout=6)
        assert time.monotonic() - stalled_at > 1.0
        assert edge.app.runtime.state == "fetching"
        proxy.stall.clear()  # bytes again: alive again, and the download completes
        wait_until(edge.app.alive, timeout=5)
        samples = _sample_liveness(edge, edge.app.repository.ready, 90)
        assert all(alive for _, alive, _ in samples)
        assert edge.app.runtime.serving.version == "v1"
    finally:
        edge.stop()
        proxy.close()
