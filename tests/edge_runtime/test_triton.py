"""``EDGE_SERVING_ENGINE=triton`` against the real ``tritonserver`` from the nvidia-pytriton wheel (``make test``
installs it into ``.tools/triton``), SeaweedFS and tritonclient: edgeloop fetches, builds, validates and swaps;
Triton serves the inference port. No stand-in: where the binary cannot run, these tests skip and say why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.edge_runtime.conftest import RunningEdge, free_port, move_channel, publish_model, wait_until

TRITON_PYTHON = Path(__file__).resolve().parents[2] / ".tools" / "triton" / "bin" / "python"
MODEL = "digits-cnn"
pytestmark = pytest.mark.integration


def triton_tools(python: Path, work: Path) -> Path:
    """``python``, the interpreter of the Triton tools venv, once its ``tritonserver`` is found and runs. Skips only
    when that venv is not there (``make test`` installs it); an error from edgeloop's own :func:`find_triton`, or a
    binary that is installed and cannot run, fails the test that asked."""
    from edge_runtime.serve.triton.dataplane import find_triton

    if not python.exists():
        pytest.skip(f"no {python}: nvidia-pytriton is not installed (make test installs it)")
    install = find_triton(None, python, work)
    probe = subprocess.run([str(install.binary), "--help"], capture_output=True, text=True, timeout=60,
                           check=False, env={**os.environ, **install.env})  # usage, and exit code 1
    said = probe.stdout + probe.stderr
    if probe.returncode == 127 or "error while loading shared libraries" in said or "model-repository" not in said:
        pytest.fail(f"the tritonserver binary of {python} cannot run here: "
                    f"{said.strip().splitlines()[-1:] or probe.returncode}")
    return python


@pytest.fixture(scope="module")
def triton_python(tmp_path_factory) -> Path:
    return triton_tools(TRITON_PYTHON, tmp_path_factory.mktemp("triton-probe"))


def test_only_a_missing_triton_venv_skips_and_an_error_of_ours_fails(tmp_path):
    """The probe's one reason to skip is an absent venv; a ConfigError from find_triton (here: an interpreter
    without nvidia-pytriton) is a failure to see, not a reason to skip 11 tests."""
    from edgeloop_core.errors import ConfigError

    with pytest.raises(pytest.skip.Exception):
        triton_tools(tmp_path / "no-venv" / "bin" / "python", tmp_path / "work")
    with pytest.raises(ConfigError) as info:  # a skip (BaseException) would escape this block and hide the bug
        triton_tools(Path(sys.executable), tmp_path / "work")
    assert "has no nvidia-pytriton" in str(info.value)


def bare_triton(tmp_path: Path, triton_python: Path, repo: Path | None = None, grpc_port: int = 0,
                backend: str = "auto"):
    """A TritonServer (not started) over ``repo`` (default ``tmp_path/repo``), without edgeloop's runtime around it;
    ``backend`` serves ONNX Runtime engines (asked for by name, it is the one, or find_triton fails)."""
    from edge_runtime.serve.triton.dataplane import TritonServer, find_triton

    return TritonServer(find_triton(None, triton_python, tmp_path / "work", backend), repo or tmp_path / "repo",
                        bind_address="127.0.0.1", grpc_port=grpc_port, metrics_port=0, log_path=tmp_path / "triton.log")


def stub_pids(server, model: str, version: str) -> list[int]:
    """Pids of ``server``'s own Python-backend stubs of that model version: its children only (the stubs of a
    tritonserver killed before linger a moment as orphans)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
            continue
        if parent == server.process.pid and f"/{model}/{version}/model.py".encode() in argv:
            found.append(int(entry.name))
    return found


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
        # the wheel has no native onnxruntime backend: Triton's Python backend runs it (edgeloop's is opt-in only)
        assert client.get_model_config(MODEL, as_json=True)["config"]["backend"] == "python"
        # ONNX Runtime in Triton reads the runtime's settings as the builtin engine does (0 threads: all cores)
        engine_json = json.loads(next((repository.triton.repo / MODEL).glob("*/engine.json")).read_text())
        usable = len(os.sched_getaffinity(0))  # 0 threads: one per core this process may use (never ORT's own 0)
        assert (engine_json["threads"], engine_json["spin"]) == (usable, usable > 4)
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

        # tritonserver hung (stopped): its process runs but answers nothing; killed, restarted, the model loaded again
        os.kill(repository.triton.process.pid, signal.SIGSTOP)
        wait_until(lambda: repository.triton.restarts == 2 and repository.triton_up, timeout=60)
        wait_until(lambda: client.is_model_ready(MODEL), timeout=30)
        assert np.allclose(infer(triton.InferenceServerClient(edge.address)), expected, atol=1e-4)
        assert [e for e in edge.events("failed") if "stopped answering" in e.get("error", "")]
        triton_process = repository.triton.process
    finally:
        edge.stop()
    assert not repository.triton.running()  # stopping the runtime stops tritonserver,
    assert triton_process.returncode == 0  # on its SIGTERM (the interpreter edgeloop's backend embeds leaves it be)


def _models(folder: Path) -> dict[str, Path]:
    """ONNX models of the shapes and types users publish: several inputs and outputs of different ranks, a
    dynamic sequence axis, unsigned and 16-bit integers, FP16, BOOL, and a fixed batch."""
    import torch
    from onnx import TensorProto
    from torch import nn

    from tests.onnx_models import elementwise_model, sensor_model

    class ImageAndTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.fc = nn.Embedding(50, 8), nn.Linear(16, 4)

        def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = self.embed(tokens).mean(1)
            return self.fc(torch.cat([image.flatten(1)[:, :8], pooled], 1)), self.embed(tokens)

    torch.manual_seed(0)
    paths = {name: folder / f"{name}.onnx" for name in ("two_in_two_out", "sensor", "half", "flags", "fixed",
                                                        "per_sample")}
    with torch.no_grad():
        torch.onnx.export(ImageAndTokens().eval(), (torch.randn(2, 1, 4, 4), torch.randint(0, 50, (2, 5))),
                          str(paths["two_in_two_out"]), input_names=["image", "tokens"],
                          output_names=["scores", "embedded"], opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "b"}, "tokens": {0: "b", 1: "t"}, "scores": {0: "b"},
                                        "embedded": {0: "b", 1: "t"}})
        torch.onnx.export(nn.Linear(6, 3).eval(), (torch.randn(1, 6),), str(paths["fixed"]), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False)
    sensor_model(paths["sensor"])
    for name, op, kind, shape in (("half", "Relu", TensorProto.FLOAT16, ["b", 6]),
                                  ("flags", "Not", TensorProto.BOOL, ["b", 6]),
                                  ("per_sample", "Neg", TensorProto.FLOAT, ["b"])):  # one value per sample
        elementwise_model(paths[name], op, kind, shape)
    return paths


BACKENDS = pytest.mark.parametrize("backend", ["edgeloop", "python"])


@BACKENDS
def test_triton_serves_models_of_every_shape_and_type_like_onnx_runtime(tmp_path, triton_python, backend):
    """The model edgeloop writes into Triton's repository (config.pbtxt, and the engine for edgeloop's backend or for
    the Python-backend model), for the class of models the builtin server takes: concurrent tritonclient calls,
    merged by Triton's dynamic batcher, answer exactly what ONNX Runtime answers for each request alone. A tensor
    with no axis but the batch is [batch, 1] to Triton's clients (Triton requires a dimension besides the batch)."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as triton

    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.triton.dataplane import TritonEngine, write_model

    server = bare_triton(tmp_path, triton_python, backend=backend)
    rng = np.random.default_rng(0)

    def sample(info, batch: int) -> np.ndarray:
        shape = [batch if i == 0 and d == -1 else (int(rng.integers(2, 7)) if d == -1 else d)
                 for i, d in enumerate(info.shape)]
        if info.datatype in ("INT64", "UINT16", "INT16"):
            return rng.integers(0, 50, shape).astype({"INT64": np.int64, "UINT16": np.uint16,
                                                      "INT16": np.int16}[info.datatype])
        if info.datatype == "BOOL":
            return rng.random(shape) > 0.5
        return rng.standard_normal(shape).astype(np.float16 if info.datatype == "FP16" else np.float32)

    server.start()
    try:
        for name, path in _models(tmp_path).items():
            engine = OrtEngine(path, max_batch_size=8, threads=1)
            write_model(server.repo, name, 1, engine_path=path, platform=engine.platform, inputs=engine.inputs,
                        outputs=engine.outputs, max_batch_size=engine.max_batch_size, max_queue_delay_us=2000,
                        edgeloop_version="v1", variant="fp32", backend=server.install.ort_backend)
            server.load(name)
            batches = [int(rng.integers(1, 3)) if engine.max_batch_size > 1 else 1 for _ in range(48)]
            requests = [{i.name: sample(i, batch) for i in engine.inputs} for batch in batches]

            def ask(inputs: dict[str, np.ndarray], model: str = name, outputs=engine.outputs,
                    batched: bool = engine.max_batch_size > 1) -> dict:
                with triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
                    tensors = []
                    for key, value in inputs.items():
                        if value.ndim == 1 and batched:  # Triton's rule: [batch] is [batch, 1]
                            value = value.reshape(-1, 1)
                        tensor = triton.InferInput(key, list(value.shape), triton.np_to_triton_dtype(value.dtype))
                        tensor.set_data_from_numpy(value)
                        tensors.append(tensor)
                    reply = client.infer(model, tensors)
                    return {o.name: reply.as_numpy(o.name) for o in outputs}

            # edgeloop's own client of Triton (validation runs through it) keeps the model's shapes
            through = TritonEngine(server, name, engine.inputs, engine.outputs, engine.max_batch_size, engine.platform)
            for key, want in engine.infer(requests[0]).items():
                assert through.infer(requests[0])[key].shape == want.shape, (name, key)
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, requests))
            for inputs, got in zip(requests, answers, strict=True):
                expected = engine.infer(inputs)
                for key, want in expected.items():
                    if want.ndim == 1 and engine.max_batch_size > 1:  # Triton's rule: a [batch] output is [batch, 1]
                        want = want.reshape(-1, 1)
                    assert got[key].dtype == want.dtype and got[key].shape == want.shape, (name, key)
                    assert np.allclose(got[key].astype(np.float64), want.astype(np.float64), atol=1e-3), (name, key)
            executions = server.metrics().get(name, {})
            if engine.max_batch_size > 1 and name != "two_in_two_out":  # varying sequence lengths never merge
                assert executions["executions"] < executions["requests"], name  # Triton merged requests
            engine.close()
    finally:
        server.stop()


def test_a_version_that_cannot_be_written_whole_leaves_the_repository_as_it_was(tmp_path, triton_python,
                                                                                 monkeypatch):
    """A full disk while writing version 2 (or a type Triton lacks) leaves no part of it where Triton looks: a later
    load, such as the one after a tritonserver restart, still serves version 1."""
    import errno

    from onnx import TensorProto

    import edge_runtime.serve.triton.dataplane as triton_module
    from edge_runtime.build.engines.base import TensorInfo
    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.triton.dataplane import TritonEngine, prune_versions, write_model
    from edgeloop_core.errors import ConfigError
    from tests.onnx_models import elementwise_model

    path = elementwise_model(tmp_path / "neg.onnx", "Neg", TensorProto.FLOAT, ["b", 3])
    engine = OrtEngine(path, max_batch_size=4, threads=1)
    repo = tmp_path / "repo"
    args = {"engine_path": path, "platform": engine.platform, "inputs": engine.inputs, "outputs": engine.outputs,
            "max_batch_size": 4, "max_queue_delay_us": 0, "variant": "fp32"}
    write_model(repo, "neg", 1, edgeloop_version="v1", **args)
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    real_write = triton_module.write_atomic

    def disk_full(target, data):
        if target.name == "engine.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_write(target, data)

    monkeypatch.setattr(triton_module, "write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_model(repo, "neg", 2, edgeloop_version="v2", **args)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="no type"):
        write_model(repo, "neg", 2, edgeloop_version="v2",
                    **{**args, "inputs": (TensorInfo("x", "BYTES", (-1, 3)),)})
    assert {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (repo / "neg").iterdir()) == ["1", "config.pbtxt"]
    (repo / "neg" / ".7.staging").mkdir()  # what a crash mid-write leaves: swept with the old versions
    prune_versions(repo, "neg", keep=1)
    assert sorted(p.name for p in (repo / "neg").iterdir()) == ["1", "config.pbtxt"]

    server = bare_triton(tmp_path, triton_python, repo)
    server.start()
    try:
        server.load("neg")
        assert server.model_ready("neg", "1")
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        assert np.array_equal(TritonEngine(server, "neg", engine.inputs, engine.outputs, 4, engine.platform).infer(
            {"x": x})["y"], -x)
    finally:
        server.stop()


@BACKENDS
def test_a_bad_request_merged_with_good_ones_fails_alone(tmp_path, triton_python, backend):
    """Triton's batcher merges eight concurrent requests (20 ms queue delay); one carries a token id outside the
    embedding table. ONNX Runtime refuses the merged run, the model runs each alone: seven answers and one
    INVALID_ARGUMENT, as edgeloop's own batcher does."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.triton.dataplane import write_model
    from tests.onnx_models import embedding_model

    table = np.arange(200, dtype=np.float32).reshape(50, 4)
    path = embedding_model(tmp_path / "embed.onnx", table)
    engine = OrtEngine(path, max_batch_size=8, threads=1)
    server = bare_triton(tmp_path, triton_python, backend=backend)
    server.start()
    try:
        write_model(server.repo, "embed", 1, engine_path=path, platform=engine.platform, inputs=engine.inputs,
                    outputs=engine.outputs, max_batch_size=8, max_queue_delay_us=20_000, edgeloop_version="v1",
                    variant="fp32", backend=server.install.ort_backend)
        server.load("embed")
        ids = [np.array([[i, i + 1, 999 if i == 3 else i + 2]], np.int64) for i in range(8)]

        def ask(value: np.ndarray):
            with triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
                tensor = triton.InferInput("ids", list(value.shape), "INT64")
                tensor.set_data_from_numpy(value)
                try:
                    return client.infer("embed", [tensor]).as_numpy("vectors")
                except InferenceServerException as exc:
                    return exc

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, ids))
        counts = server.metrics()["embed"]
        assert counts["executions"] < 8  # the eight were merged
        for i, (value, answer) in enumerate(zip(ids, answers, strict=True)):
            if i == 3:
                assert isinstance(answer, InferenceServerException) and "INVALID_ARGUMENT" in str(answer.status())
                assert "out of data bounds" in answer.message()
            else:
                assert np.array_equal(answer, table[value])
    finally:
        server.stop()


def test_python_backend_runs_a_request_whose_second_input_has_another_shape_on_its_own(tmp_path, triton_python):
    """Eight concurrent requests merged by Triton's batcher (50 ms queue delay) into one ``execute`` of the
    Python-backend model; one carries a second input of another width (Triton hands requests of different shapes to
    one ``execute`` where an input allows ragged batches). The model checks every input's shape, so that request
    runs on its own and all eight get ONNX Runtime's answer (before, only the first input was checked and the failed
    merge failed the whole batch)."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as triton
    from onnx import TensorProto, helper, numpy_helper

    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.triton.dataplane import write_model
    from tests.onnx_models import save

    path = save(tmp_path / "two.onnx", [helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=1),
                                        helper.make_node("Add", ["x", "s"], ["z"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3]),
                 helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "n"])],
                [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 3])],
                [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    engine = OrtEngine(path, max_batch_size=8, threads=1)
    server = bare_triton(tmp_path, triton_python, backend="python")
    server.start()
    try:
        write_model(server.repo, "two", 1, engine_path=path, platform=engine.platform, inputs=engine.inputs,
                    outputs=engine.outputs, max_batch_size=8, max_queue_delay_us=50_000, edgeloop_version="v1",
                    variant="fp32", backend="python")
        config = server.repo / "two" / "config.pbtxt"  # as a user's config may: Triton then merges other widths
        config.write_text(config.read_text().replace('name: "y" data_type: TYPE_FP32 dims: [ -1 ]',
                                                     'name: "y" data_type: TYPE_FP32 dims: [ -1 ] '
                                                     'allow_ragged_batch: true', 1))
        assert "allow_ragged_batch" in config.read_text()
        server.load("two")
        requests = [(np.full((1, 3), i, np.float32), np.ones((1, 2 if i == 3 else 4), np.float32)) for i in range(8)]

        def ask(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            with triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
                tensors = []
                for name, value in zip(("x", "y"), pair, strict=True):
                    tensors.append(triton.InferInput(name, list(value.shape), "FP32"))
                    tensors[-1].set_data_from_numpy(value)
                return client.infer("two", tensors).as_numpy("z")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, requests))
        assert server.metrics()["two"]["executions"] < 8  # merged into one execute
        for (x, y), answer in zip(requests, answers, strict=True):
            assert np.array_equal(answer, x + y.sum(1, keepdims=True))
    finally:
        server.stop()


def test_an_installs_python_backend_stub_imports_numpy_and_onnxruntime_from_the_runtimes_venv(tmp_path,
                                                                                               triton_python):
    """A Triton install laid out as the Jetson image has it (``bin/``, ``lib/`` with the system's libpython,
    ``backends/python/`` with its stub; made here from the wheel's files): the stub embeds a Python whose own
    site-packages have no onnxruntime; it runs isolated (PYTHONPATH ignored) and takes its prefix from the
    ``python3`` on PATH, so the runtime puts the venv it names first there."""

    from onnx import TensorProto

    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.triton.dataplane import TritonEngine, TritonServer, find_triton, write_model
    from tests.onnx_models import elementwise_model

    wheel = find_triton(None, triton_python, tmp_path / "wheel-work", "python")
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "tritonserver").symlink_to(wheel.binary)
    shutil.copytree(wheel.backends / "python", home / "backends" / "python")  # Triton's backend and the stub
    (home / "lib").mkdir()
    for library in (wheel.binary.parents[3] / "nvidia_pytriton.libs").iterdir():
        (home / "lib" / library.name).symlink_to(library)
    probe = "import json, sysconfig; v = sysconfig.get_config_var; print(json.dumps([v('LIBDIR'), v('INSTSONAME')]))"
    facts = json.loads(subprocess.run([str(triton_python), "-c", probe], capture_output=True, text=True, check=True,
                                      timeout=60).stdout)
    (home / "lib" / facts[1]).symlink_to(Path(facts[0]) / facts[1])  # the system's libpython, as apt installs it
    install = find_triton(home, triton_python, tmp_path / "work", "python")
    assert install.ort_backend == "python" and install.env["PATH"].startswith(f"{triton_python.parent}:")
    path = elementwise_model(tmp_path / "neg.onnx", "Neg", TensorProto.FLOAT, ["b", 3])
    engine = OrtEngine(path, max_batch_size=4, threads=1)
    server = TritonServer(install, tmp_path / "repo", bind_address="127.0.0.1", grpc_port=0, metrics_port=0,
                          log_path=tmp_path / "triton.log")
    server.start()
    try:
        write_model(server.repo, "neg", 1, engine_path=path, platform=engine.platform, inputs=engine.inputs,
                    outputs=engine.outputs, max_batch_size=4, max_queue_delay_us=0, edgeloop_version="v1",
                    variant="fp32", backend=install.ort_backend)
        server.load("neg")
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        assert np.array_equal(TritonEngine(server, "neg", engine.inputs, engine.outputs, 4, engine.platform).infer(
            {"x": x})["y"], -x)
    finally:
        server.stop()


def test_two_models_through_triton_and_a_dead_stub_touches_only_its_own(store, signing_key, trained, edge_settings,
                                                                       triton_python, tmp_path):
    """Two models, each with its own life cycle, served by one Triton's Python backend (a stub process per model):
    both answer like ONNX Runtime; the stub of one killed (as the OOM killer would), tritonserver lives on and calls
    the model ready while every request to it fails; edgeloop sees the stub gone, reports it and loads the model
    again, while the other model keeps answering."""
    import onnxruntime as ort
    import tritonclient.grpc as triton

    from edgeloop.samples import digits_linear

    linear_name = "digits-linear"
    linear = digits_linear(tmp_path / "linear")[0]
    publish_model(store, signing_key, trained, "v1")
    publish_model(store, signing_key, trained, "v1", name=linear_name, files={"fp32": linear},
                  reference_files={"fp32": linear})
    edge = RunningEdge(edge_settings(store.bucket, models=[{"name": MODEL}, {"name": linear_name, "max_batch_size": 4}],
                                     serving_engine="triton", triton_python=triton_python, triton_backend="python",
                                     grpc_port=free_port(), triton_metrics_port=0, control_port=0))
    x = trained.x_val[:3]

    def infer(client, model: str) -> np.ndarray:
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(model, [tensor]).as_numpy("logits")

    def expected(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    try:
        edge.wait_ready(180)
        client = triton.InferenceServerClient(edge.address)
        triton_server = edge.app.repository.triton
        assert np.allclose(infer(client, linear_name), expected(linear), atol=1e-4)
        served = {r.name: r.serving for r in edge.app.repository.runtimes.values()}
        cnn_expected = expected(trained.good[served[MODEL].plan.variant.name])
        assert np.allclose(infer(client, MODEL), cnn_expected, atol=1e-4)
        version = served[linear_name].engine.version
        assert {(MODEL, served[MODEL].engine.version), (linear_name, version)} <= triton_server.python_stubs()
        (stub,) = stub_pids(triton_server, linear_name, version)
        os.kill(stub, signal.SIGKILL)
        for _ in range(20):
            assert np.allclose(infer(client, MODEL), cnn_expected, atol=1e-4)  # the other model is untouched
        wait_until(lambda: [e for e in edge.events("failed") if "stub" in e.get("error", "")], timeout=30)
        wait_until(lambda: (linear_name, version) in triton_server.python_stubs() and client.is_model_ready(
            linear_name), timeout=30)
        assert np.allclose(infer(client, linear_name), expected(linear), atol=1e-4)
        assert [e["model_name"] for e in edge.events("failed") if "stub" in e.get("error", "")] == [linear_name]
    finally:
        edge.stop()


def test_a_tritonserver_that_cannot_start_says_why_in_one_line(tmp_path, triton_python):
    """The inference port taken by another process: start fails with Triton's own reason (its error lines, not the
    option table it printed before them), and a second start's failure does not repeat the first one's lines."""
    import socket

    from edgeloop_core.errors import EngineError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = bare_triton(tmp_path, triton_python, grpc_port=taken.getsockname()[1])
        for _ in range(2):
            with pytest.raises(EngineError) as info:
                server.start()
            said = str(info.value)
            assert "\n" not in said and "already in use" in said and "exit_timeout" not in said
            assert said.count("failed to start GRPC service") == 1, said  # this start's lines only


def test_edgeloop_backend_is_built_once_found_prebuilt_and_only_when_asked_for(tmp_path, triton_python, monkeypatch):
    """edgeloop's backend is compiled against the interpreter it embeds, once (keyed by the source and the
    interpreter); a prebuilt one (images build it at build time) needs no compiler. ``auto`` never builds it (it
    serves through Triton's own backends); without a compiler ``edgeloop`` refuses in one line; a source that does
    not compile says so in one line and leaves nothing half-built."""
    from edge_runtime.serve.triton import native as triton_native
    from edge_runtime.serve.triton.dataplane import find_triton
    from edgeloop_core.errors import ConfigError

    monkeypatch.setattr(triton_native, "PREBUILT", tmp_path / "prebuilt")
    built = triton_native.backend_library(triton_python, tmp_path / "work")
    assert built.name == "libtriton_edgeloop.so" and built.stat().st_size > 0
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert triton_native.backend_library(triton_python, tmp_path / "work") == built  # built once, not again
    install = find_triton(None, triton_python, tmp_path / "work", "edgeloop")
    assert install.ort_backend == "edgeloop" and install.env["EDGELOOP_TRITON_PYTHON"] == str(triton_python)
    assert (install.backends / "edgeloop" / "libtriton_edgeloop.so").exists()
    assert (install.backends / "edgeloop" / "edgeloop_engine.py").exists()

    elsewhere = tmp_path / "elsewhere"  # no build there, and no compiler
    assert find_triton(None, triton_python, elsewhere, "auto").ort_backend == "python"  # auto never builds it
    assert not (elsewhere / "edgeloop-backend").exists()
    with pytest.raises(ConfigError, match="no C compiler"):
        find_triton(None, triton_python, elsewhere, "edgeloop")

    monkeypatch.delenv("CC")
    prebuilt = triton_native.prebuild(triton_python)  # what `edgeloop edge triton-backend` does in an image
    assert prebuilt.parent.parent == tmp_path / "prebuilt"
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert triton_native.backend_library(triton_python, elsewhere) == prebuilt
    home = install.binary.parent.parent  # the wheel's tree has a Triton install's layout: bin/, backends/
    installed = find_triton(home, triton_python, tmp_path / "home-work", "edgeloop")  # its backends stay as they are
    assert (installed.backends / "edgeloop" / triton_native.LIBRARY).exists()
    assert (installed.backends / "python").resolve() == (home / "backends" / "python").resolve()  # linked beside ours
    assert not (home / "backends" / "edgeloop").exists()

    bare = tmp_path / "bare-venv"  # an interpreter without numpy and onnxruntime: nothing to run engines with
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    with pytest.raises(ConfigError, match="cannot import numpy and onnxruntime"):
        triton_native.backend_library(bare / "bin" / "python", elsewhere)

    monkeypatch.delenv("CC")
    broken = tmp_path / "backend.c"
    broken.write_text(triton_native.SOURCE.read_text().replace("return NULL;\n}", "return NULL\n}", 1))
    monkeypatch.setattr(triton_native, "SOURCE", broken)
    with pytest.raises(ConfigError) as info:
        triton_native.backend_library(triton_python, elsewhere)
    assert "did not compile" in str(info.value) and "\n" not in str(info.value)
    assert [p.name for p in (elsewhere / "edgeloop-backend").iterdir()] == []  # nothing half-built


def test_edgeloop_backend_refuses_an_engine_it_cannot_load_and_serves_shared_memory_clients(tmp_path,
                                                                                           triton_python):
    """An engine the embedded interpreter cannot load (its file gone) fails Triton's load with ONNX Runtime's
    reason, and tritonserver serves on; a client passing tensors through Triton's system shared memory (input read
    from, output written into its region) gets ONNX Runtime's answer."""
    import tritonclient.grpc as triton
    import tritonclient.utils.shared_memory as shm
    from onnx import TensorProto

    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.triton.dataplane import TritonEngine, write_model
    from edgeloop_core.errors import EngineError
    from tests.onnx_models import elementwise_model

    path = elementwise_model(tmp_path / "neg.onnx", "Neg", TensorProto.FLOAT, ["b", 3])
    engine = OrtEngine(path, max_batch_size=4, threads=1)
    server = bare_triton(tmp_path, triton_python, backend="edgeloop")
    server.start()
    try:
        args = {"platform": engine.platform, "inputs": engine.inputs, "outputs": engine.outputs,
                "max_batch_size": 4, "max_queue_delay_us": 0, "edgeloop_version": "v1", "variant": "fp32",
                "backend": "edgeloop"}
        write_model(server.repo, "gone", 1, engine_path=tmp_path / "missing.onnx", **args)
        with pytest.raises(EngineError, match="missing.onnx"):
            server.load("gone")
        write_model(server.repo, "neg", 1, engine_path=path, **args)
        server.load("neg")
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        assert np.array_equal(TritonEngine(server, "neg", engine.inputs, engine.outputs, 4, engine.platform).infer(
            {"x": x})["y"], -x)

        client = triton.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        key = f"/edgeloop-test-{os.getpid()}"
        region = shm.create_shared_memory_region("tensors", key, 2 * x.nbytes)
        try:
            shm.set_shared_memory_region(region, [x])
            client.register_system_shared_memory("tensors", key, 2 * x.nbytes)
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_shared_memory("tensors", x.nbytes)
            wanted = triton.InferRequestedOutput("y")
            wanted.set_shared_memory("tensors", x.nbytes, offset=x.nbytes)
            reply = client.infer("neg", [tensor], outputs=[wanted])
            assert reply.get_output("y").shape == [2, 3]
            assert np.array_equal(shm.get_contents_as_numpy(region, np.float32, [2, 3], offset=x.nbytes), -x)
            _unregister_when_released(client, "tensors")
        finally:
            shm.destroy_shared_memory_region(region)
    finally:
        server.stop()


def _unregister_when_released(client, name: str, timeout_s: float = 10.0) -> None:
    """Unregister a region as a client must: tritonserver answers a request before it releases the request (and
    with it the region's use count), so on a busy machine an unregister right after the reply can find the region
    still "in use" for a moment; anything else, or still in use after ``timeout_s``, fails."""
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.unregister_system_shared_memory(name)
            return
        except InferenceServerException as exc:
            if "currently in use" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_edgeloop_backend_gives_back_the_memory_of_versions_it_unloaded(tmp_path, triton_python):
    """Version after version loaded into one tritonserver (a device that retrains daily swaps one a day for months),
    each run once and the one before unloaded: the process keeps about the size it had after the first few (ONNX
    Runtime's sessions live in tritonserver's own heap with edgeloop's backend)."""
    import torch
    import tritonclient.grpc as tritonclient
    from torch import nn

    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.serve.triton.dataplane import TritonEngine, prune_versions, write_model

    path = tmp_path / "conv.onnx"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}}, opset_version=17, dynamo=False)
    engine = OrtEngine(path, max_batch_size=8, threads=1)
    server = bare_triton(tmp_path, triton_python, backend="edgeloop")
    server.start()

    def resident_mib() -> float:
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024

    client = tritonclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")

    def loaded() -> list[tuple[str, str]]:
        index = client.get_model_repository_index(headers=server.control_headers, as_json=True)["models"]
        return [(m.get("version"), m.get("state")) for m in index if m.get("state") != "UNAVAILABLE"]

    sizes = []
    try:
        for number in range(1, 19):
            write_model(server.repo, "conv", number, engine_path=path, platform=engine.platform, inputs=engine.inputs,
                        outputs=engine.outputs, max_batch_size=8, max_queue_delay_us=0, edgeloop_version=f"v{number}",
                        variant="fp32", backend="edgeloop")
            server.load("conv")
            TritonEngine(server, "conv", engine.inputs, engine.outputs, 8, engine.platform).infer(
                {"input": np.zeros((8, 3, 64, 64), np.float32)})
            prune_versions(server.repo, "conv", number)
            wait_until(lambda n=str(number): loaded() == [(n, "READY")], timeout=30)  # the one before unloaded
            sizes.append(resident_mib())
    finally:
        server.stop()
    # the typical size of the last five against that of the first five (the heap's per-thread arenas come and go by
    # a few MiB); without giving memory back it grows ~5 MiB a version here
    assert float(np.median(sizes[-5:]) - np.median(sizes[:5])) < 24, [round(s) for s in sizes]
