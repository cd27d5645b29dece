"""``EDGE_SERVING_ENGINE=triton`` against the real ``tritonserver`` from the nvidia-pytriton wheel (``make test``
installs it into ``.tools/triton``), SeaweedFS and tritonclient: edgeloop fetches, builds, validates and swaps;
Triton serves the inference port. No stand-in: where the binary cannot run, these tests skip and say why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.edge_runtime.conftest import RunningEdge, free_port, move_channel, publish_model, wait_until

TRITON_PYTHON = Path(__file__).resolve().parents[2] / ".tools" / "triton" / "bin" / "python"
MODEL = "digits-cnn"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def triton_python(tmp_path_factory) -> Path:
    from edge_runtime.errors import ConfigError
    from edge_runtime.triton import find_triton

    if not TRITON_PYTHON.exists():
        pytest.skip(f"no {TRITON_PYTHON}: nvidia-pytriton is not installed (make test installs it)")
    try:
        install = find_triton(None, TRITON_PYTHON, tmp_path_factory.mktemp("triton-probe"))
        probe = subprocess.run([str(install.binary), "--help"], capture_output=True, text=True, timeout=60,
                               check=False, env={**os.environ, **install.env})  # usage, and exit code 1
    except (ConfigError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the tritonserver binary cannot run here: {exc}")
    said = probe.stdout + probe.stderr
    if probe.returncode == 127 or "error while loading shared libraries" in said or "model-repository" not in said:
        pytest.skip(f"the tritonserver binary cannot run here: {said.strip().splitlines()[-1:] or probe.returncode}")
    return TRITON_PYTHON


def triton_config(client, model: str) -> dict[str, str]:
    config = client.get_model_config(model, as_json=True)["config"]
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def test_triton_serves_what_edgeloop_validated_swaps_under_load_refuses_a_bad_version_and_survives_a_crash(
        store, signing_key, trained, edge_settings, triton_python):
    import onnxruntime as ort
    import tritonclient.grpc as triton
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, serving_engine="triton", triton_python=triton_python,
                                     grpc_port=free_port(), triton_metrics_port=0, control_port=0))
    x = trained.x_val[:7]

    def infer(client) -> np.ndarray:
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(MODEL, [tensor]).as_numpy("logits")

    try:
        edge.wait_ready(120)
        repository = edge.app.repository
        assert edge.app.grpc_port == repository.triton.grpc_port != edge.app.control_port
        client = triton.InferenceServerClient(edge.address)  # Triton itself, on the device's inference port
        assert client.is_server_ready() and client.get_server_metadata(as_json=True)["name"] == "triton"
        served = edge.app.runtime.serving.plan.variant.name
        expected = ort.InferenceSession(str(trained.good[served]), providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]
        assert np.allclose(infer(client), expected, atol=1e-4)
        assert triton_config(client, MODEL) == {"edgeloop_version": "v1", "variant": served}
        through = [e for e in edge.events("validated") if e.get("source") == "triton"]
        assert through and through[0]["version"] == "v1" and through[0]["passed"]
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException):  # apps on the inference port cannot unload what edgeloop serves
            client.unload_model(MODEL)
        assert client.is_model_ready(MODEL)
        with __import__("grpc").insecure_channel(f"127.0.0.1:{edge.app.control_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # the pod's probes ask edgeloop

        # a new version swaps in while apps keep calling: no failed request
        failures: list[Exception] = []
        answered = [0]
        stop = threading.Event()

        def keep_asking() -> None:
            with triton.InferenceServerClient(edge.address) as own:
                while not stop.is_set():
                    try:
                        infer(own)
                        answered[0] += 1
                    except Exception as exc:  # noqa: BLE001 - collected and asserted below
                        failures.append(exc)

        asker = threading.Thread(target=keep_asking)
        asker.start()
        publish_model(store, signing_key, trained, "v2")
        edge.app.runtime.wake()
        wait_until(lambda: edge.app.runtime.serving.version == "v2", timeout=90)
        stop.set()
        asker.join(10)
        assert failures == [] and answered[0] > 0
        assert triton_config(client, MODEL)["edgeloop_version"] == "v2"
        # Triton unloads the old version once its requests finished; then one version serves, and no candidate
        wait_until(lambda: [(m["name"], m.get("version"), m.get("state")) for m in client.get_model_repository_index(
                            headers=repository.triton.control_headers, as_json=True)["models"]
                            if m.get("state") != "UNAVAILABLE"] == [(MODEL, "2", "READY")], timeout=30)

        # a version that fails validation never reaches Triton: the old one keeps serving there
        publish_model(store, signing_key, trained, "v3", files=trained.untrained, channel=None)
        move_channel(store, signing_key, "v3")
        edge.app.runtime.wake()
        wait_until(lambda: edge.app.runtime.state.value == "failed", timeout=60)
        assert "failed validation" in edge.app.runtime.last_error
        assert not [e for e in edge.events("validated") if e.get("source") == "triton" and e["version"] == "v3"]
        assert triton_config(client, MODEL)["edgeloop_version"] == "v2" and np.allclose(infer(client), expected,
                                                                                        atol=1e-4)
        assert not (repository.triton.repo / (MODEL + "__candidate")).exists()

        # tritonserver killed: reported, restarted, the last good version loaded again
        os.kill(repository.triton.process.pid, signal.SIGKILL)
        wait_until(lambda: repository.triton.restarts == 1 and repository.triton_up, timeout=90)
        wait_until(lambda: client.is_model_ready(MODEL), timeout=30)
        assert triton_config(client, MODEL)["edgeloop_version"] == "v2"
        assert np.allclose(infer(triton.InferenceServerClient(edge.address)), expected, atol=1e-4)
        crashed = [e for e in edge.events("failed") if e.get("scope") == "triton"]
        assert crashed and "tritonserver exited" in crashed[0]["error"]
        assert edge.events("triton_restarted")
        # Triton's own counters, scraped into telemetry (Triton refreshes them every couple of seconds, and the
        # restart started them from zero)
        wait_until(lambda: edge.app.stats()["models"][0].get("triton", {}).get("requests", 0) >= 1, timeout=15)
        assert json.dumps(edge.app.stats())  # the stats event stays JSON
    finally:
        edge.stop()
    assert not repository.triton.running()  # stopping the runtime stops tritonserver
