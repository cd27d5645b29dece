"""Which Triton backend serves what (``EDGE_TRITON_BACKEND``), and the config.pbtxt edgeloop writes for each, read
back with Triton's own model-config proto (``model_config_pb2``, shipped by tritonclient): no tritonserver needed.
The backend directories are real file layouts of a Triton install (``backends/<name>/libtriton_<name>.so``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_runtime.build.engines.base import TensorInfo

INPUTS = (TensorInfo("image", "FP32", (-1, 3, 8, 8)), TensorInfo("ids", "INT64", (-1,)))
OUTPUTS = (TensorInfo("logits", "FP32", (-1, 10)),)


def triton_home(root: Path, *backends: str) -> Path:
    """A Triton install's layout: ``bin/tritonserver`` and one folder per backend with Triton's library in it."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_bytes(b"\x7fELF")
    for name in backends:
        (root / "backends" / name).mkdir(parents=True)
        (root / "backends" / name / f"libtriton_{name}.so").write_bytes(b"\x7fELF")
    (root / "backends" / "pytorch").mkdir(parents=True, exist_ok=True)  # a folder without its library: not there
    return root


@pytest.mark.parametrize(("requested", "installed", "chosen"), [
    ("auto", {"onnxruntime", "python", "tensorrt"}, "onnxruntime"),  # the Jetson and x86 Triton releases
    ("auto", {"python"}, "python"),  # the nvidia-pytriton wheel
    ("python", {"onnxruntime", "python"}, "python"),
    ("onnxruntime", {"onnxruntime"}, "onnxruntime"),
    ("edgeloop", {"onnxruntime", "python"}, "edgeloop"),  # opt-in only
    ("edgeloop", set(), "edgeloop"),
])
def test_the_backend_for_onnx_runtime_engines_is_tritons_own_where_installed(requested, installed, chosen):
    from edge_runtime.serve.triton.dataplane import ort_backend_for

    assert ort_backend_for(requested, frozenset(installed)) == chosen


@pytest.mark.parametrize(("requested", "installed", "said"), [
    ("auto", {"tensorrt"}, "no onnxruntime or python backend"),
    ("onnxruntime", {"python"}, "no onnxruntime backend"),
    ("python", {"onnxruntime"}, "no python backend"),
    ("tensorflow", {"python"}, "is not one of"),
])
def test_a_backend_that_is_not_there_is_refused_in_one_line(requested, installed, said):
    from edge_runtime.serve.triton.dataplane import ort_backend_for
    from edgeloop_core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        ort_backend_for(requested, frozenset(installed))
    assert said in str(info.value) and "\n" not in str(info.value)


def test_an_install_with_the_onnxruntime_backend_serves_through_it_and_without_it_through_python(tmp_path):
    """Detection reads the install's backend directory; ``auto`` never builds edgeloop's C backend. An install's
    Python-backend stub runs the system libpython and takes its prefix from the ``python3`` on PATH: the runtime's
    venv comes first there (its numpy, onnxruntime)."""
    from edge_runtime.serve.triton.dataplane import find_triton, installed_backends

    full = triton_home(tmp_path / "full", "onnxruntime", "python", "tensorrt")
    assert installed_backends(full / "backends") == {"onnxruntime", "python", "tensorrt"}
    install = find_triton(full, None, tmp_path / "work")
    assert install.ort_backend == "onnxruntime" and "PATH" not in install.env
    assert not (tmp_path / "work" / "edgeloop-backend").exists()  # nothing compiled

    python_only = triton_home(tmp_path / "python-only", "python")
    install = find_triton(python_only, Path(sys.executable), tmp_path / "work")
    assert install.ort_backend == "python"
    assert install.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)  # its python3 comes first


def parse(text: str):
    """config.pbtxt as Triton reads it: text format of ``inference.ModelConfig`` (a field Triton does not have, or a
    wrong type, raises here as it fails Triton's load)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["tensorrt_plan", "onnxruntime", "python", "edgeloop"])
def test_every_config_edgeloop_writes_is_a_valid_triton_model_config(tmp_path, backend):
    from edge_runtime.serve.triton.dataplane import write_model

    engine = tmp_path / ("engine.plan" if backend == "tensorrt_plan" else "model.onnx")
    engine.write_bytes(b"engine")
    folder = write_model(tmp_path / "repo", "digits", 3, engine_path=engine,
                         platform="tensorrt_plan" if backend == "tensorrt_plan" else "onnxruntime_onnx",
                         inputs=INPUTS, outputs=OUTPUTS, max_batch_size=8, max_queue_delay_us=500,
                         edgeloop_version="v7", variant="int8", threads=3, spin=False,
                         backend="python" if backend == "tensorrt_plan" else backend)
    config = parse((folder.parent / "config.pbtxt").read_text())
    assert config.name == "digits" and config.max_batch_size == 8
    assert [(i.name, list(i.dims)) for i in config.input] == [("image", [3, 8, 8]), ("ids", [1])]
    assert list(config.input[1].reshape.shape) == []  # a [batch] tensor is [batch, 1] to clients
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.version_policy.latest.num_versions == 1
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters["edgeloop_version"] == "v7" and parameters["variant"] == "int8"
    files = sorted(p.name for p in folder.iterdir())
    if backend == "tensorrt_plan":
        assert (config.platform, config.backend) == ("tensorrt_plan", "")
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU and files == ["model.plan"]
    elif backend == "onnxruntime":  # Triton's own backend runs the ONNX that passed validation, threads as set
        assert config.backend == "onnxruntime" and files == ["model.onnx"]
        assert (folder / "model.onnx").resolve() == engine.resolve()
        assert (parameters["intra_op_thread_count"], parameters["inter_op_thread_count"]) == ("3", "1")
        assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    else:
        assert config.backend == backend and "intra_op_thread_count" not in parameters
        assert "engine.json" in files and ("model.py" in files) == (backend == "python")
