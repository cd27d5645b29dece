"""edgeloop's own Triton C backend (``backend.c``, opt-in: ``EDGE_TRITON_BACKEND=edgeloop``) where a real
tritonserver cannot take it here: ``triton_backend_harness.c`` plays tritonserver's side of the backend API (a
stand-in that enforces the contract tritonbackend.h documents: see its header comment) to hand the backend an input
in GPU memory, one in pinned host memory, a response Triton fails to make, a batched model with no inputs, and other
API versions. The API-version refusal is also seen through the real tritonserver (``.tools/triton``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.edge_runtime.test_triton import TRITON_PYTHON, bare_triton, triton_tools

HARNESS = Path(__file__).with_name("triton_backend_harness.c")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def triton_python(tmp_path_factory) -> Path:
    return triton_tools(TRITON_PYTHON, tmp_path_factory.mktemp("triton-probe"))


@pytest.fixture(scope="module")
def harness(tmp_path_factory, triton_python):
    """(run, models): ``run(scenario, *api)`` drives the backend built for the Triton venv's interpreter through
    the harness; ``models`` holds the Neg model ``x`` [batch, 3] → ``y`` and a no-input model (``y`` = [1.5, 2.5])."""
    from onnx import TensorProto, helper, numpy_helper

    from edge_runtime.serve.triton import native
    from tests.onnx_models import elementwise_model, save

    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) to build the harness with")
    work = tmp_path_factory.mktemp("c-backend")
    library = native.backend_library(triton_python, work / "work")
    backend_dir = work / "backend"
    native.install_backend(library, backend_dir)
    binary = work / "harness"
    subprocess.run(["cc", "-O1", "-rdynamic", "-o", str(binary), str(HARNESS), "-ldl"], check=True, timeout=120)
    models = {}
    engines = {"neg": elementwise_model(work / "neg.onnx", "Neg", TensorProto.FLOAT, ["b", 3]),
               "const": save(work / "const.onnx", [helper.make_node("Identity", ["c"], ["y"])], [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                             [numpy_helper.from_array(__import__("numpy").array([1.5, 2.5], "float32"), "c")])}
    configs = {"neg": {"name": "neg", "max_batch_size": 4,
                       "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]}],
                       "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}]},
               "const": {"name": "const", "max_batch_size": 4, "input": [],  # batched, and nothing carries the batch
                         "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [2]}]}}
    for name, path in engines.items():
        (work / name / "1").mkdir(parents=True)
        (work / name / "1" / "engine.json").write_text(json.dumps({"engine": str(path), "threads": 1, "spin": False}))
        models[name] = (work / name, json.dumps(configs[name]))

    def run(scenario: str, model: str = "neg", api: tuple[int, int] | None = None) -> subprocess.CompletedProcess:
        folder, config = models[model]
        argv = [str(binary), str(backend_dir / native.NAME / native.LIBRARY), str(backend_dir / native.NAME),
                str(folder), config, scenario, *(map(str, api) if api else ())]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "EDGELOOP_TRITON_PYTHON": str(triton_python)})

    return run


def lines(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)  # a crash, or a contract violation
    return done.stdout.splitlines()


def test_an_input_in_gpu_memory_is_refused_alone_and_pinned_memory_is_read(harness):
    """Three requests in one execution: host memory, GPU memory (a client's CUDA shared memory: an address that is
    not mapped here, so reading it would crash) and pinned host memory. The GPU one gets INVALID_ARG saying why;
    the other two are answered."""
    said = lines(harness("memory"))
    assert "request 0: ok y=-1,-2,-3" in said and "request 2: ok y=-7,-8,-9" in said
    (refused,) = [line for line in said if line.startswith("request 1:")]
    assert refused.startswith("request 1: error 3 edgeloop backend: input x is in GPU memory")


def test_a_request_whose_response_could_not_be_made_still_gets_an_error(harness):
    said = lines(harness("noresponse"))
    assert "request 1: ok y=-4,-5,-6" in said
    assert "request 0: error 1 edgeloop backend: the response to this request could not be made" in said


def test_a_batched_model_with_no_inputs_answers_every_request(harness):
    said = lines(harness("noinputs", "const"))
    assert said.count("request 0: ok y=1.5,2.5") == 1 and said.count("request 1: ok y=1.5,2.5") == 1


@pytest.mark.parametrize(("api", "refused"), [((1, 18), True), ((2, 0), True), ((0, 99), True), ((1, 19), False),
                                              ((1, 27), False)])
def test_the_backend_refuses_another_major_or_an_older_minor_api_in_one_line(harness, api, refused):
    said = lines(harness("api", api=api))
    if refused:
        assert said == [f"initialize: error 5 edgeloop backend: this Triton's backend API is {api[0]}.{api[1]}, the "
                        "backend was written for 1.19 (the same major, that minor or newer): serve through Triton's "
                        "onnxruntime or python backend (EDGE_TRITON_BACKEND=auto)"]
    else:
        assert said == ["initialize: ok"]


def test_real_tritonserver_refuses_a_backend_written_for_a_newer_api(tmp_path, triton_python, monkeypatch):
    """The same check against the real tritonserver: a build that claims API 1.999 fails the model's load with the
    backend's line, and tritonserver serves on."""
    from edge_runtime.serve.triton import native
    from edge_runtime.serve.triton.dataplane import write_model
    from edgeloop_core.errors import EngineError

    monkeypatch.setattr(native, "PREBUILT", tmp_path / "prebuilt")
    monkeypatch.setenv("CC", "cc -DEDGELOOP_API_MINOR=999")
    server = bare_triton(tmp_path, triton_python, backend="edgeloop")
    server.start()
    try:
        from edge_runtime.build.engines.base import TensorInfo

        tensors = (TensorInfo("x", "FP32", (-1, 3)),), (TensorInfo("y", "FP32", (-1, 3)),)
        write_model(server.repo, "neg", 1, engine_path=tmp_path / "neg.onnx", platform="onnxruntime_onnx",
                    inputs=tensors[0], outputs=tensors[1], max_batch_size=4, max_queue_delay_us=0,
                    edgeloop_version="v1", variant="fp32", backend="edgeloop")
        with pytest.raises(EngineError) as info:
            server.load("neg")
        assert "written for 1.999" in str(info.value) and "\n" not in str(info.value)
        assert server.live()
    finally:
        server.stop()
