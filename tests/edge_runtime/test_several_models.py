"""Several models on one runtime, against the real runtime, SeaweedFS and tritonclient: each model has its own life
cycle (one failing never touches the others), one endpoint serves them by name, and a model that does not fit the
memory budget is refused with a reason while the others serve."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgeloop.samples import digits_linear, gemm_classifier
from tests.edge_runtime.conftest import RunningEdge, free_port, move_channel, publish_model, wait_until

CNN = "digits-cnn"
LINEAR = "digits-linear"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def linear(tmp_path_factory) -> Path:
    """A second, different real model: logistic regression trained on the digits."""
    return digits_linear(tmp_path_factory.mktemp("linear"))[0]


def publish_linear(store, signing_key, trained, linear: Path, version: str):
    return publish_model(store, signing_key, trained, version, name=LINEAR, files={"fp32": linear},
                         reference_files={"fp32": linear})


def test_two_models_serve_side_by_side_and_fail_swap_and_unload_independently(
        store, signing_key, trained, edge_settings, linear):
    import onnxruntime as ort
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    publish_model(store, signing_key, trained, "v1")
    publish_linear(store, signing_key, trained, linear, "v1")
    metrics_port = free_port()
    edge = RunningEdge(edge_settings(store.bucket, models=[{"name": CNN}, {"name": LINEAR, "max_batch_size": 4}],
                                     metrics_port=metrics_port, repository_control=True, control_token="t0ken"))
    control = {"authorization": "Bearer t0ken"}
    x = trained.x_val[:3]

    def infer(client, model: str) -> tuple[str, np.ndarray]:
        given = triton.InferInput("input", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        result = client.infer(model, [given])
        return result.get_response().model_version, result.as_numpy("logits")

    def expected(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    try:
        edge.wait_ready()
        client = triton.InferenceServerClient(edge.address)
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert {n: (m["state"], m["version"]) for n, m in index.items()} == {CNN: ("READY", "v1"),
                                                                              LINEAR: ("READY", "v1")}
        served = edge.app.repository.runtime(CNN).serving.plan.variant.name  # the served variant's own file
        for model, path in ((CNN, trained.good[served]), (LINEAR, linear)):
            version, logits = infer(client, model)
            assert version == "v1" and np.allclose(logits, expected(path), atol=1e-4)
            assert client.is_model_ready(model)
            assert client.get_model_metadata(model, as_json=True)["outputs"][0]["name"] == "logits"
        assert edge.app.repository.runtime(LINEAR).batching[0] == 4  # its own batching limit
        with pytest.raises(InferenceServerException) as unknown:
            infer(client, "not-served")
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        for model in (CNN, LINEAR):
            assert f'edgeloop_requests_total{{code="OK",model="{model}"}} 1.0' in body
            assert f'edgeloop_model_ready{{model="{model}"}} 1.0' in body
            assert f'edgeloop_model_state{{model="{model}",state="serving"}} 1.0' in body

        # the CNN's next version fails validation; the linear model's succeeds, and nobody's requests fail meanwhile
        publish_model(store, signing_key, trained, "v2", files=trained.untrained, channel=None)
        publish_linear(store, signing_key, trained, linear, "v2")  # moves its stable channel
        move_channel(store, signing_key, "v2")
        failures: list[Exception] = []
        stop = threading.Event()

        def keep_asking() -> None:
            with triton.InferenceServerClient(edge.address) as own:
                while not stop.is_set():
                    for model in (CNN, LINEAR):
                        try:
                            infer(own, model)
                        except Exception as exc:  # noqa: BLE001 - collected and asserted below
                            failures.append(exc)

        asker = threading.Thread(target=keep_asking)
        asker.start()
        for runtime in edge.app.repository.runtimes.values():
            runtime.wake()
        cnn, lin = edge.app.repository.runtime(CNN), edge.app.repository.runtime(LINEAR)
        wait_until(lambda: lin.serving.version == "v2" and cnn.state.value == "failed", timeout=60)
        stop.set()
        asker.join(10)
        assert failures == []
        assert cnn.serving.version == "v1" and "failed validation" in cnn.last_error
        assert infer(client, CNN)[0] == "v1" and infer(client, LINEAR)[0] == "v2"
        assert not client.is_server_ready()  # policy "all": the CNN does not serve what is desired
        failed = [e for e in edge.events("failed") if e.get("model_name") == CNN]
        assert failed and not [e for e in edge.events("failed") if e.get("model_name") == LINEAR]
        assert {e["model_name"] for e in edge.events("serving")} == {CNN, LINEAR}

        # unloading one leaves the other
        client.unload_model(CNN, headers=control)
        with pytest.raises(InferenceServerException) as gone:
            infer(client, CNN)
        assert gone.value.status() == "StatusCode.UNAVAILABLE"
        assert infer(client, LINEAR)[0] == "v2"
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index[CNN]["state"] == "UNAVAILABLE" and index[LINEAR]["state"] == "READY"
        assert client.is_server_ready()  # the one desired model left serves its desired version
        stats = edge.app.stats()
        assert [m["model_name"] for m in stats["models"]] == [CNN, LINEAR]
        assert {m["model_name"]: m["requests"] > 0 for m in stats["models"]} == {CNN: True, LINEAR: True}
    finally:
        edge.stop()


def test_a_model_that_does_not_fit_the_memory_budget_is_refused_while_the_other_serves(
        store, signing_key, trained, edge_settings, tmp_path):
    rng = np.random.default_rng(0)
    hidden = 170_000  # ~50 MB of weights
    big = gemm_classifier(tmp_path / "big.onnx", [(rng.standard_normal((64, hidden), dtype=np.float32) * 0.01,
                                               np.zeros(hidden, np.float32)),
                                              (rng.standard_normal((hidden, 10), dtype=np.float32) * 0.01,
                                               np.zeros(10, np.float32))])
    publish_model(store, signing_key, trained, "v1")
    publish_model(store, signing_key, trained, "v1", name="big-mlp", files={"fp32": big},
                  reference_files={"fp32": big})
    edge = RunningEdge(edge_settings(store.bucket, models=[{"name": "big-mlp"}, {"name": CNN}],
                                     memory_budget_bytes=32 << 20))
    try:
        repository = edge.app.repository
        wait_until(lambda: repository.runtime(CNN).ready() and repository.runtime("big-mlp").failures > 0, 60)
        refused = repository.runtime("big-mlp")
        assert refused.serving is None and refused.state.value == "failed"
        assert "needs 48.6 MiB (its weights" in refused.last_error
        assert "of the memory budget of 32.0 MiB is free" in refused.last_error
        assert not list((edge.app.settings.cache_dir / "artifacts" / "big-mlp").glob("*/*.onnx"))  # not downloaded
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(edge.address)
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["big-mlp"]["state"] == "UNAVAILABLE" and "memory" in index["big-mlp"]["reason"]
        assert index[CNN]["state"] == "READY" and not client.is_server_ready()  # "all": one desired model is out
        assert repository.shared.memory.held and sum(repository.shared.memory.held.values()) <= 32 << 20
        (event,) = [e for e in edge.events("failed") if e.get("model_name") == "big-mlp"][:1]
        assert event["error_kind"] == "InsufficientMemory"
    finally:
        edge.stop()


def test_the_desired_file_adds_and_removes_models(store, signing_key, trained, edge_settings, linear, tmp_path):
    publish_model(store, signing_key, trained, "v1")
    publish_linear(store, signing_key, trained, linear, "v1")
    desired = tmp_path / "desired.json"

    def write(models: list[dict]) -> None:  # as the kubelet updates a ConfigMap volume: a new file swapped in
        staged = tmp_path / "desired.json.new"
        staged.write_text(json.dumps({"models": models}))
        staged.replace(desired)

    write([{"name": CNN, "version": "v1"}])
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, ready_policy="any",
                                     repository_control=True, control_token="t0ken"))
    try:
        edge.wait_ready()
        repository = edge.app.repository
        assert list(repository.runtimes) == [CNN]
        write([{"name": CNN, "version": "v1"}, {"name": LINEAR}])
        wait_until(lambda: LINEAR in repository.runtimes and repository.runtime(LINEAR).ready(), timeout=30)
        write([{"name": LINEAR}])
        wait_until(lambda: list(repository.runtimes) == [LINEAR], timeout=30)
        assert repository.ready() and repository.runtime(LINEAR).serving.version == "v1"
        assert [e["model_name"] for e in edge.events("removed")] == [CNN]
        write([{"name": LINEAR}, {"name": LINEAR}])  # refused, nothing moves
        wait_until(lambda: any("listed twice" in e.get("error", "") for e in edge.events("failed")), timeout=30)
        assert list(repository.runtimes) == [LINEAR] and repository.runtime(LINEAR).serving is not None
        # repository control serves a model the file does not list, beside the file's; the file's next edit keeps it
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(edge.address)
        write([{"name": LINEAR}])
        wait_until(lambda: not repository.desired.changed(), timeout=10)
        client.load_model(CNN, headers={"authorization": "Bearer t0ken"})
        assert client.is_model_ready(CNN) and client.is_model_ready(LINEAR)
        write([{"name": LINEAR, "version": "v1"}])
        wait_until(lambda: not repository.desired.changed(), timeout=10)
        assert set(repository.runtimes) == {CNN, LINEAR} and client.is_model_ready(CNN)
    finally:
        edge.stop()


def test_the_memory_budget_without_a_setting_follows_what_the_kernel_reports(tmp_path):
    from edge_runtime.build.memory import MemoryBudget
    from edgeloop_core.errors import InsufficientMemory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8000000 kB\nMemFree:          100000 kB\nMemAvailable:     600000 kB\n")
    budget = MemoryBudget(None, reserve_bytes=100 << 20, meminfo=meminfo)
    assert budget.free_bytes() == 600000 * 1024 - (100 << 20)
    budget.check("a/v1 (fp32)", 400 << 20, basis="its weights")  # fits: ~485 MiB free
    with pytest.raises(InsufficientMemory, match=r"a/v2 \(fp32\) needs 600.0 MiB \(recorded .*\) but only 485.9 MiB "
                                                 r"of the memory available \(less a 100 MiB reserve\)"):
        budget.check("a/v2 (fp32)", 600 << 20, basis="recorded when it was last loaded here")
    budget = MemoryBudget(64 << 20)
    budget.hold("a/v1/fp32#1", 40 << 20)
    with pytest.raises(InsufficientMemory, match="held: a/v1/fp32#1 40.0 MiB"):
        budget.check("b/v1 (fp32)", 30 << 20, basis="its weights")
    budget.release("a/v1/fp32#1")
    budget.check("b/v1 (fp32)", 30 << 20, basis="its weights")
    assert MemoryBudget(None, meminfo=tmp_path / "missing").free_bytes() is None  # unknown: nothing is refused


def test_engines_are_built_one_at_a_time_whichever_model_asks(store, signing_key, trained, edge_settings, linear,
                                                               monkeypatch):
    """Two models starting together: their engines are built (and loaded) one after the other, never at once (a
    TensorRT build takes the GPU and gigabytes of shared memory on a Jetson). A spy around the real builder holds
    each build a little longer so an overlap could not hide."""
    import time as clock

    import edge_runtime.build.engines.provider as provider

    real, inside, overlaps, builds = provider.build_engine, [0], [0], []

    def spy(*args, **kwargs):
        inside[0] += 1
        overlaps[0] = max(overlaps[0], inside[0])
        try:
            clock.sleep(0.3)
            builds.append(args[0].variant.name)
            return real(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(provider, "build_engine", spy)
    publish_model(store, signing_key, trained, "v1")
    publish_linear(store, signing_key, trained, linear, "v1")
    edge = RunningEdge(edge_settings(store.bucket, models=[{"name": CNN}, {"name": LINEAR}]))
    try:
        edge.wait_ready()
        assert len(builds) >= 2 and overlaps[0] == 1
    finally:
        edge.stop()
