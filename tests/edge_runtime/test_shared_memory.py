"""System shared memory with tritonclient's own helpers, unchanged: inputs read in place, outputs written to the
app's region, regions checked and released."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.edge_runtime.conftest import RunningEdge, publish_model

pytestmark = pytest.mark.integration
MODEL = "digits-cnn"


@pytest.fixture
def edge(store, signing_key, trained, edge_settings):
    publish_model(store, signing_key, trained, "v1")
    running = RunningEdge(edge_settings(store.bucket), store=store)
    running.wait_ready()
    yield running
    running.stop()


def test_tensors_through_system_shared_memory(edge, trained):
    client = triton.InferenceServerClient(edge.address)
    x = trained.x_val[:8].astype(np.float32)
    in_handle = shm.create_shared_memory_region("frames", "/edgeloop_test_frames", x.nbytes)
    out_handle = shm.create_shared_memory_region("scores", "/edgeloop_test_scores", 8 * 10 * 4)
    try:
        shm.set_shared_memory_region(in_handle, [x])
        client.register_system_shared_memory("frames", "/edgeloop_test_frames", x.nbytes)
        client.register_system_shared_memory("scores", "/edgeloop_test_scores", 8 * 10 * 4)
        status = client.get_system_shared_memory_status(as_json=True)
        assert {r["name"] for r in status["regions"].values()} == {"frames", "scores"}

        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory("frames", x.nbytes)
        output = triton.InferRequestedOutput("logits")
        output.set_shared_memory("scores", 8 * 10 * 4)
        client.infer(MODEL, [tensor], outputs=[output])
        from_shm = shm.get_contents_as_numpy(out_handle, np.float32, [8, 10])
        plain = triton.InferInput("input", list(x.shape), "FP32")
        plain.set_data_from_numpy(x)
        expected = client.infer(MODEL, [plain]).as_numpy("logits")
        np.testing.assert_allclose(from_shm, expected, rtol=1e-5, atol=1e-5)

        # a window past the region, a wrong byte count and an unknown region are INVALID_ARGUMENT
        for region, size in (("frames", x.nbytes + 4), ("nowhere", x.nbytes)):
            bad = triton.InferInput("input", list(x.shape), "FP32")
            bad.set_shared_memory(region, size)
            with pytest.raises(InferenceServerException) as info:
                client.infer(MODEL, [bad])
            assert "INVALID_ARGUMENT" in str(info.value.status())
        with pytest.raises(InferenceServerException) as twice:
            client.register_system_shared_memory("frames", "/edgeloop_test_frames", x.nbytes)
        assert "ALREADY_EXISTS" in str(twice.value.status())
        client.unregister_system_shared_memory("frames")
        assert set(client.get_system_shared_memory_status(as_json=True).get("regions", {})) == {"scores"}
        client.unregister_system_shared_memory()  # all
        assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


@pytest.mark.parametrize("key", ["/../../etc/passwd", "relative/../x", "/", "/missing_region_object"])
def test_keys_outside_dev_shm_or_missing_objects_are_refused(edge, key):
    client = triton.InferenceServerClient(edge.address)
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("r", key, 16)
    assert "INVALID_ARGUMENT" in str(info.value.status())


@pytest.fixture
def quick_release_edge(store, signing_key, trained, edge_settings):
    publish_model(store, signing_key, trained, "v1")
    running = RunningEdge(edge_settings(store.bucket, shm_release_after_s=0.5), store=store)
    running.wait_ready()
    yield running
    running.stop()


def _regions(address: str) -> set[str]:
    observer = triton.InferenceServerClient(address)
    try:
        return {r["name"] for r in observer.get_system_shared_memory_status(as_json=True).get("regions", {}).values()}
    finally:
        observer.close()


def _wait_for(condition, timeout_s: float = 15.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_regions_are_released_when_their_client_leaves_or_deletes_the_object(quick_release_edge, trained):
    address = quick_release_edge.address
    x = trained.x_val[:1].astype(np.float32)
    kept = shm.create_shared_memory_region("kept", "/edgeloop_test_kept", x.nbytes)
    left = shm.create_shared_memory_region("left", "/edgeloop_test_left", x.nbytes)
    deleted = shm.create_shared_memory_region("deleted", "/edgeloop_test_deleted", x.nbytes)
    staying = triton.InferenceServerClient(address)
    try:
        staying.register_system_shared_memory("kept", "/edgeloop_test_kept", x.nbytes)
        staying.register_system_shared_memory("deleted", "/edgeloop_test_deleted", x.nbytes)
        # another app (a process of its own: clients in one process share one connection) registers "left" and
        # exits without unregistering
        app = ("import sys, tritonclient.grpc as t; t.InferenceServerClient(sys.argv[1])"
               ".register_system_shared_memory('left', '/edgeloop_test_left', int(sys.argv[2]))")
        subprocess.run([sys.executable, "-c", app, address, str(x.nbytes)], check=True, timeout=60)
        assert _regions(address) == {"kept", "left", "deleted"}
        shm.destroy_shared_memory_region(deleted)  # this one's object is deleted while registered
        assert _wait_for(lambda: _regions(address) == {"kept"}), _regions(address)
        # the region whose client stays connected still serves
        shm.set_shared_memory_region(kept, [x])
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory("kept", x.nbytes)
        assert staying.infer(MODEL, [tensor]).as_numpy("logits").shape == (1, 10)
    finally:
        staying.close()
        shm.destroy_shared_memory_region(kept)
        shm.destroy_shared_memory_region(left)


def test_connected_peers_reads_the_kernels_tcp_tables(tmp_path):
    import sys

    from edge_runtime.serve.shm import connected_peers, peer_address

    if sys.byteorder != "little":
        pytest.skip("the table below is written as a little-endian kernel prints it")
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "tcp").write_text(header + "".join([
        "   0: 0100007F:1F90 0100007F:D3A2 01 00000000:00000000 00:00000000 00000000     0        0 1\n",  # ours
        "   1: 0100007F:1F90 0100007F:D3A4 06 00000000:00000000 00:00000000 00000000     0        0 2\n",  # TIME_WAIT
        "   2: 0100007F:0050 0100007F:D3A6 01 00000000:00000000 00:00000000 00000000     0        0 3\n",  # other port
    ]))
    (tmp_path / "tcp6").write_text(header + "".join([
        "   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D3A8 01 0:0 0:0 0 0 0 4\n",
        "   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:D3AA 01 0:0 0:0 0 0 0 5\n",
    ]))
    peers = connected_peers(0x1F90, proc=tmp_path)
    assert peers == {("127.0.0.1", 0xD3A2), ("::1", 0xD3A8), ("127.0.0.1", 0xD3AA)}
    assert peer_address("ipv4:127.0.0.1:54178") in peers  # 0xD3A2
    assert peer_address("ipv6:[::1]:54184") in peers
    assert peer_address("ipv6:%5B::1%5D:54184") in peers
    assert peer_address("ipv6:[::ffff:127.0.0.1]:54186") in peers  # an IPv4 client of a dual-stack server
    assert peer_address("unix:/tmp/edge.sock") is None
    assert connected_peers(0x1F90, proc=tmp_path / "missing") is None
