"""A server pinned to one core stays on it: ONNX Runtime, left to count threads itself, pins a worker to every core
of the machine, past ``taskset`` (issue 25, item 10)."""

from __future__ import annotations

import os
import shutil
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


def thread_cores(pid: int) -> dict[str, str]:
    """Every thread of ``pid``: "<tid> <name>" → its Cpus_allowed_list."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        found[f"{task.name} {fields['Name'].strip()}"] = fields["Cpus_allowed_list"].strip()
    return found


def test_intra_op_threads_default_to_the_cores_this_process_may_use():
    from edge_runtime.build.engines.onnxruntime import intra_op_threads, usable_cores

    assert usable_cores() == len(os.sched_getaffinity(0))
    assert intra_op_threads(0) == usable_cores()
    assert intra_op_threads(3) == 3


@pytest.mark.integration
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"),
                    reason="needs two usable cores and taskset: ONNX Runtime can only escape to another core")
def test_every_thread_of_a_server_pinned_to_one_core_stays_there(store, signing_key, trained, local_s3, key_dir,
                                                                   tmp_path):
    from edgeloop_core.protos import inference_pb2 as pb
    from edgeloop_core.protos import inference_pb2_grpc

    publish_model(store, signing_key, trained, "v1")
    port, core = free_port(), min(os.sched_getaffinity(0))
    config = tmp_path / "edge.yaml"  # ONNX Runtime threads left at their default (0)
    config.write_text(f"s3_bucket: {store.bucket}\ncache_dir: {tmp_path / 'cache'}\nmetrics_port: 0\n"
                      f"verify_key_file: {key_dir / 'verify-key.pem'}\n")
    env = {**os.environ, **local_s3.env(), "EDGE_S3_ENDPOINT_URL": local_s3.endpoint_url}
    env.pop("EDGE_ORT_INTRA_OP_THREADS", None)
    server = subprocess.Popen(["taskset", "-c", str(core), EDGELOOP, "edge", "serve", "--config", str(config),
                               "--grpc-port", str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        x = trained.x_val[:4].astype(np.float32)
        request = pb.ModelInferRequest(model_name="digits-cnn")
        request.inputs.add(name="input", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        deadline = time.monotonic() + 90
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            while True:  # ready once it answers; then run the engine enough that its thread pool is up
                try:
                    stub.ModelInfer(request, timeout=2)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline and server.poll() is None, "edge serve did not serve"
                    time.sleep(0.2)
            for _ in range(50):
                stub.ModelInfer(request, timeout=5)
        cores = thread_cores(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    escaped = {thread: allowed for thread, allowed in cores.items() if allowed != str(core)}
    assert len(cores) > 1 and not escaped, f"threads left core {core}: {escaped}\n{output[-2000:]}"
