"""`edgeloop edge serve` and `edgeloop edge infer` as a user runs them: real processes, real ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.edge_runtime.conftest import free_port, publish_model

EDGELOOP = str(Path(sys.executable).parent / "edgeloop")


def test_bad_settings_are_one_line(tmp_path):
    (tmp_path / "edge.json").write_text(json.dumps({"grpc_port": "eighty"}))
    result = subprocess.run([EDGELOOP, "edge", "serve", "--config", str(tmp_path / "edge.json")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: setting grpc_port: Input should be a valid integer, unable to parse string as an integer"]


@pytest.mark.integration
def test_serve_then_infer_then_sigterm(store, signing_key, trained, local_s3, key_dir, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    publish_model(store, signing_key, trained, "v1")
    port = free_port()
    config = tmp_path / "edge.yaml"
    config.write_text(f"s3_bucket: {store.bucket}\ncache_dir: {tmp_path / 'cache'}\nmetrics_port: 0\n"
                      f"verify_key_file: {key_dir / 'verify-key.pem'}\n")
    env = {**os.environ, **local_s3.env(), "EDGE_S3_ENDPOINT_URL": local_s3.endpoint_url}
    server = subprocess.Popen([EDGELOOP, "edge", "serve", "--config", str(config), "--grpc-port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline and server.poll() is None, "edge serve did not become ready"
                time.sleep(0.2)
        np.savez(tmp_path / "check.npz", inputs=trained.x_val.astype(np.float32), labels=trained.y_val)
        infer = subprocess.run([EDGELOOP, "edge", "infer", str(tmp_path / "check.npz"), "--address",
                                f"127.0.0.1:{port}", "--batch-size", "8"], capture_output=True, text=True,
                               timeout=60, check=False, env=env)
        assert infer.returncode == 0, infer.stderr
        assert "accuracy" in infer.stdout and "version v1" in infer.stdout
        bad = subprocess.run([EDGELOOP, "edge", "infer", str(tmp_path / "check.npz"), "--address",
                              f"127.0.0.1:{port}", "--model", "other"], capture_output=True, text=True, timeout=60,
                             check=False)
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "serving" in output


TRITON_PYTHON = Path(__file__).resolve().parents[2] / ".tools" / "triton" / "bin" / "python"
ORIN_NX = Path(__file__).resolve().parents[1] / "data" / "sysfs-orin-nx"
REPORT_KEYS = {"schema_version", "created_at", "hostname", "edgeloop_version", "device", "backend", "target_key",
               "checks", "precision", "winner", "ok"}
CHECKS = ["device", "cuda", "tensorrt", "power_rails", "demo_model", "tensorrt_engines", "onnxruntime_engines",
          "precision", "gpu_conformance_tests", "triton_libraries", "python_libraries"]


def _selfcheck(tmp_path, **env):
    import shutil

    if not TRITON_PYTHON.exists():
        pytest.skip(f"no {TRITON_PYTHON}: nvidia-pytriton is not installed (make test installs it)")
    shutil.copytree(ORIN_NX, tmp_path / "orin", dirs_exist_ok=True)  # its power rails, as an Orin NX shows them
    env = {**os.environ, "EDGE_POWER_ROOT": str(tmp_path / "orin"), **env}
    started = time.monotonic()
    result = subprocess.run([EDGELOOP, "edge", "selfcheck", "--out", str(tmp_path / "report.json"), "--budget-s",
                             "0.3"], capture_output=True, text=True, timeout=120, check=False, env=env)
    return result, time.monotonic() - started


def test_selfcheck_runs_on_this_cpu_and_says_what_it_could_not_check(tmp_path):
    import importlib.util

    from edge_runtime.report.selfcheck import SelfcheckReport

    result, seconds = _selfcheck(tmp_path, EDGE_TRITON_PYTHON=str(TRITON_PYTHON))
    assert result.returncode == 0, result.stdout + result.stderr
    assert seconds < 30 and "Traceback" not in result.stderr
    raw = json.loads((tmp_path / "report.json").read_text())
    report = SelfcheckReport.model_validate(raw)  # the schema, strictly (extra keys are refused)
    assert set(raw) == REPORT_KEYS and raw["schema_version"] == 1
    assert [c["name"] for c in raw["checks"]] == CHECKS
    assert all(set(c) == {"name", "status", "reason", "seconds", "details"} and c["reason"] for c in raw["checks"])
    checks = {c.name: c for c in report.checks}
    if importlib.util.find_spec("tensorrt") is None:  # this machine: no TensorRT, no GPU
        for name in ("tensorrt", "tensorrt_engines", "precision", "gpu_conformance_tests"):
            assert checks[name].status == "skipped", checks[name]
        assert "not installed" in checks["tensorrt"].reason and "needs TensorRT" in checks["precision"].reason
        assert report.winner is None
    assert checks["device"].status == "ok" and report.backend == "onnxruntime"
    assert report.target_key is not None and report.target_key.startswith("ort") and "fp32" in report.target_key
    assert report.device["arch"] in ("x86_64", "aarch64")
    assert checks["power_rails"].status == "ok" and "VDD_IN" in checks["power_rails"].reason
    (figure,) = [p for p in report.precision if p.backend == "onnxruntime" and p.variant == "fp32"]
    assert figure.passed and figure.agreement == 1.0 and figure.b1_p50_ms > 0 and figure.mj_per_inference > 0
    assert checks["triton_libraries"].status == "ok" and checks["python_libraries"].status == "ok"
    assert report.ok and "report:" in result.stdout


def test_selfcheck_fails_when_tritons_libraries_do_not_resolve(tmp_path):
    import shutil

    site = next(TRITON_PYTHON.parent.parent.glob("lib/python3*/site-packages/pytriton/tritonserver"), None) \
        if TRITON_PYTHON.exists() else None
    home = tmp_path / "triton"
    (home / "backends").mkdir(parents=True)
    if site is not None:  # the wheel's binary away from the libraries its RPATH ($ORIGIN/../lib) points to
        (home / "bin").mkdir()
        shutil.copy(site / "bin" / "tritonserver", home / "bin" / "tritonserver")
    result, _ = _selfcheck(tmp_path, EDGE_TRITON_HOME=str(home))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    raw = json.loads((tmp_path / "report.json").read_text())
    (check,) = [c for c in raw["checks"] if c["name"] == "triton_libraries"]
    assert check["status"] == "failed" and "not found" in check["reason"] and "libtritonserver" in check["reason"]
    assert raw["ok"] is False
