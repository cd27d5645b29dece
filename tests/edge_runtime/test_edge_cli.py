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
