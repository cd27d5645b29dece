"""System shared memory with tritonclient's own helpers, unchanged: inputs read in place, outputs written to the
app's region, regions checked and released."""

from __future__ import annotations

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
