"""The device check's CUDA probe against a stand-in driver library (tests/edge_runtime/cuda_driver_standin.c: the
cuda.h calls it makes, with the driver's error codes), and its demo model: three valid ONNX precisions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

STANDIN = Path(__file__).with_name("cuda_driver_standin.c")
PROBE = "import json; from edge_runtime.report.selfcheck import cuda_probe; print(json.dumps(cuda_probe()))"


@pytest.fixture(scope="module")
def driver_dir(tmp_path_factory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the CUDA driver stand-in")
    folder = tmp_path_factory.mktemp("driver")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(folder / "libcuda.so.1"), str(STANDIN)],
                   check=True, timeout=60)
    return folder


def _probe(env: dict[str, str]) -> list:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True,
                          env=env)
    return json.loads(done.stdout)


def test_the_cuda_probe_reads_gpu_0_through_the_driver_api(driver_dir):
    status, reason, found = _probe({"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(driver_dir)})
    assert status == "ok", reason
    assert (found["name"], found["cc_major"], found["cc_minor"], found["sm_count"]) == ("Orin", 8, 7, 8)
    assert found["memory_bytes"] == 16 << 30 and found["driver"] == "12.6"
    assert reason == "Orin, sm_87, 8 SMs, CUDA driver 12.6"


def test_a_driver_without_a_usable_gpu_fails_with_the_likely_fix(driver_dir):
    status, reason, _ = _probe({"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(driver_dir),
                                "STANDIN_CUINIT_ERROR": "100"})
    assert status == "failed" and reason.startswith("cuInit: CUDA error 100") and "video (44)" in reason


def test_no_driver_is_a_skip_with_its_reason(tmp_path):
    import ctypes.util

    status, reason, _ = _probe({"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(tmp_path)})
    if ctypes.util.find_library("cuda") is not None:  # a real driver here: the probe found it
        assert status in ("ok", "failed"), reason
    else:
        assert status == "skipped" and "libcuda.so.1 not found" in reason


def test_the_demo_model_is_three_valid_precisions_that_agree_with_fp32(tmp_path):
    import onnx
    import onnxruntime as ort

    from edge_runtime.report.demo_model import write_demo_model

    demo = write_demo_model(tmp_path, samples=16)
    assert [v.name for v in demo.manifest.variants] == ["fp32", "fp16", "int8-qdq"]
    with np.load(demo.validation) as npz:
        x, reference = npz["inputs"], npz["reference:logits"]
    ops = {}
    for name, path in demo.files.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        ops[name] = {n.op_type for n in model.graph.node}
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        assert out.dtype == np.float32 and (out.argmax(1) == reference.argmax(1)).mean() >= 0.9, name
    assert "QuantizeLinear" in ops["int8-qdq"] and "DequantizeLinear" in ops["int8-qdq"]
    assert "Cast" in ops["fp16"] and not ops["fp32"] & {"Cast", "QuantizeLinear"}
    assert demo.files["int8-qdq"].stat().st_size < demo.files["fp16"].stat().st_size < \
        demo.files["fp32"].stat().st_size


def test_on_an_orin_nx_the_demo_model_is_built_with_tensorrt_and_a_precision_wins(monkeypatch, tmp_path):
    """The TensorRT branch end to end on the strict TensorRT 10.3 stand-in (tests/trt_standin.py: real API names,
    plans and profiles; it computes with ONNX Runtime, so the timings say nothing about a GPU, only that each variant
    was built, validated against FP32 and timed), as an Orin NX on JetPack 6.2 with its power rails."""
    from edge_runtime.build.choice import VariantFigures, choose_variant
    from edge_runtime.report.selfcheck import run_selfcheck
    from edge_runtime.settings import EdgeSettings
    from edgeloop_core.timing import Timing
    from tests import trt_standin

    host = tmp_path / "host"
    host.mkdir()
    (host / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    (host / "model").write_text("NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00")
    trt_standin.install(monkeypatch, "10.3", device=trt_standin.Device("Orin", 8, 7, 8, 16 << 30))
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "sysfs-orin-nx", tmp_path / "orin")
    settings = EdgeSettings(tegra_release_file=host / "nv_tegra_release", device_model_file=host / "model",
                            power_root=tmp_path / "orin")
    report = run_selfcheck(settings, tmp_path / "work", tests=None, budget_s=0.1)
    checks = {c.name: c for c in report.checks}
    assert report.ok, [c for c in report.checks if c.status == "failed"]
    assert report.backend == "tensorrt" and checks["tensorrt"].status == "ok"
    assert report.target_key.startswith("trt10.3.0.30-sm87x8-orin-nx-l4t36.4-") and "-fp32-" in report.target_key
    assert checks["tensorrt_engines"].details["built"] == ["int8-qdq", "fp16", "fp32"]
    trt = {p.variant: p for p in report.precision if p.backend == "tensorrt"}
    assert set(trt) == {"int8-qdq", "fp16", "fp32"}
    assert all(p.passed and p.agreement >= 0.9 and p.mj_per_inference > 0 for p in trt.values())
    assert {p.target_key.split("-")[-2] for p in trt.values()} == {"int8", "fp16", "fp32"}
    # the winner is the runtime's own balanced choice over these figures
    figures = [VariantFigures(p.variant, p.target_key, True, p.agreement, p.batch, Timing(p.b1_p50_ms, 0, 1),
                              Timing(p.batched_p50_ms, 0, 1)) for p in trt.values()]
    assert report.winner == choose_variant(figures, "balanced").chosen
    assert checks["precision"].reason.startswith(f"{report.winner} wins")
    int8, fp16 = trt["int8-qdq"], trt["fp16"]
    lost = int8.b1_p50_ms * int8.batched_p50_ms > fp16.b1_p50_ms * fp16.batched_p50_ms
    assert ("int8-qdq lost to fp16" in checks["precision"].reason) == lost
    assert checks["cuda"].status in ("ok", "skipped") and checks["gpu_conformance_tests"].status == "skipped"


def test_with_a_gpu_the_installed_gpu_tests_run_and_their_failure_fails_the_check(driver_dir, tmp_path):
    """A GPU (the driver stand-in) and installed tests: ``pytest -m gpu`` runs them; one failing fails the check."""
    import os

    tests = tmp_path / "checkout" / "tests"
    (tests / "edge_runtime").mkdir(parents=True)
    (tests / "edge_runtime" / "test_gpu_things.py").write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_works():\n    pass\n\n\n@pytest.mark.gpu\n"
        "def test_breaks():\n    assert 1 == 2\n\n\ndef test_not_gpu():\n    raise AssertionError('never run')\n")
    env = {**os.environ, "LD_LIBRARY_PATH": str(driver_dir), "EDGE_POWER_ROOT": str(tmp_path / "no-rails")}
    edgeloop = str(Path(sys.executable).parent / "edgeloop")
    done = subprocess.run([edgeloop, "edge", "selfcheck", "--out", str(tmp_path / "report.json"), "--tests",
                           str(tests), "--budget-s", "0.1"], capture_output=True, text=True, timeout=180,
                          check=False, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["checks"]}
    assert checks["cuda"]["status"] == "ok" and checks["cuda"]["details"]["name"] == "Orin"
    gpu_tests = checks["gpu_conformance_tests"]
    assert gpu_tests["status"] == "failed" and "1 failed, 1 passed" in gpu_tests["reason"]
    assert "test_breaks" in gpu_tests["details"]["output_tail"] and "test_not_gpu" not in gpu_tests["details"][
        "output_tail"]
    assert checks["power_rails"]["status"] == "skipped" and "no INA3221 rail" in checks["power_rails"]["reason"]
