"""Serving benchmark: edgeloop against the servers users would pick instead, on the same ONNX file and the same cores.

    .venv/bin/python bench/serve.py [--levels 1,8,32] [--requests 2000] [--servers edgeloop,kserve,triton,echo]
                                    [--models small,large] [--capture-rounds 5] [--profile] [--quick]
                                    [--readme PATH] [--plot PATH]

Each server runs as its own process pinned to core 0; this process, the load generator, is pinned to core 1 (both
through ``bench/harness.py``). One load generator for all: a lean one that pre-serializes the Open Inference
Protocol request once and keeps ``concurrency`` calls in flight on one grpc.aio channel (so the client costs as
little CPU as possible), plus a tritonclient check that each server answers correctly. Servers:

* **edgeloop** — ``edgeloop edge serve`` on the model published to a SeaweedFS on loopback (FP32 variant, ONNX
  Runtime, default batching: max 16, waiting for company while waiting brings it), and **edgeloop, batching off**
  (max batch 1): their ratio is what dynamic batching buys;
* **edgeloop + Triton** — the same, with ``EDGE_SERVING_ENGINE=triton``: edgeloop fetches, validates and swaps,
  the wheel's ``tritonserver`` serves (batching as Triton alone below), the engine run by edgeloop's own Triton backend
  (in tritonserver's process), and by Triton's Python backend (``edgeloop-triton-python``, as Triton alone runs it);
* **KServe** — ``kserve`` 0.21 in its own virtualenv (``KSERVE_PYTHON``, default ``/tmp/kserve-venv/bin/python``),
  a model class over ONNX Runtime (one intra-op thread, as every server here), gRPC v2; at its defaults, and tuned as
  its users run it for speed (per-request latency logging off), which the ÷ KServe column is against;
* **Triton** — the ``tritonserver`` binary inside the ``nvidia-pytriton`` wheel (``TRITON_VENV``, default
  ``.tools/triton``), Python backend over ONNX Runtime, dynamic batching on (max 16);
* **echo floor** — a bare grpc.aio server whose Open Inference Protocol ModelInfer returns its input (no model, no
  checks): what a Python gRPC server costs per request before it does anything;
* **edgeloop, capture off / 1% / 100%** (``edgeloop-capture``, issue 26) — the builtin server on the small model at
  c=32 whose desired file gives the model field capture sampling 1% or 100% of requests (no budgets), or no capture
  policy; the three run side by side on the server core and are measured in turn over ``--capture-rounds`` rounds
  (median round), capture uploading its shards to the benchmark's SeaweedFS as it would from a device; each row
  says what was captured, dropped (by reason) and uploaded, from the server's Prometheus metrics;
* **in-process ONNX Runtime** on the same core: the ceiling.

Every server runs ONNX Runtime with one intra-op and one inter-op thread and spinning off (given no thread count,
ONNX Runtime pins a worker to every core of the machine, past ``taskset``), and after each warm-up the benchmark
checks that every thread of every server process (children included) may run on the server core only
(``/proc/<pid>/task/*/status``): a thread elsewhere stops the run (:class:`~bench.harness.NotPinnedError`).

Reported per server, model and concurrency: requests/s, p50/p99 ms, server CPU per request (from /proc, the whole
process tree), mean formed batch (edgeloop's and Triton's metrics), and ratios against KServe and in-process ORT;
then issue 25's targets for the builtin server, each PASS or FAIL, dynamic batching against batching off, and a
3×224×224 FP32 input through protobuf bytes against system shared memory (edgeloop); then the capture rows and
issue 26's targets (capture at 1% costs ≤ 5% of throughput, at 100% ≤ 30%, against capture off in the same run).
Writes its section of ``bench/README.md`` (``bench/report.py``) and a plot; ``--quick`` runs the small model at c=1
and c=32 with few requests (the capture rows: one round) and writes into a copy of the README. Never part of the test
run; servers missing here are skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402 - after the path the benchmarks import from
    EDGELOOP,
    SERVER_CORE,
    NotPinnedError,
    ServerProcess,
    cpu_seconds,
    free_port,
    local_store,
    on_core,
    pin_load_generator,
    thread_affinities,
    thread_cpu,
    verify_pinned,
)
from bench.report import BenchRun  # noqa: E402

if TYPE_CHECKING:
    from edgeloop.local_s3 import LocalS3
    from edgeloop_core.store import ObjectStore

KSERVE_PYTHON = os.environ.get("KSERVE_PYTHON", "/tmp/kserve-venv/bin/python")
TRITON_VENV = Path(os.environ.get("TRITON_VENV", ROOT / ".tools" / "triton"))
"""A venv with nvidia-pytriton, numpy<2 and onnxruntime: ``make test`` makes ``.tools/triton``."""
QUICK = {"models": "small", "levels": "1,32", "requests": 300, "capture_rounds": 1}
FULL = {"models": "small,large", "levels": "1,8,32", "requests": 2000, "capture_rounds": 5}
"""``--models``, ``--levels``, ``--requests`` and ``--capture-rounds`` of a ``--quick`` run and of a full one, unless
given."""


def build_models(work: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """The small CNN (digits, 1×8×8) and a large CNN (~48 M MAC, 3×64×64), FP32, dynamic batch, seeded."""
    import torch
    from torch import nn

    from components.export import export_onnx
    from components.models import ModelSpec, build_model

    torch.manual_seed(0)
    small = export_onnx(build_model(ModelSpec("cnn", 1, 8, 10)).eval(), work / "small.onnx", (1, 8, 8))
    large_net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(64, 10)).eval()
    large = export_onnx(large_net, work / "large.onnx", (3, 64, 64))
    return {"small": (small, (1, 8, 8)), "large": (large, (3, 64, 64))}


def request_bytes(model: str, shape: tuple[int, ...], seed: int = 0) -> bytes:
    """One batch-1 ModelInferRequest, serialized once."""
    from edgeloop_core.protos import inference_pb2 as pb

    x = np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


async def drive(address: str, payload: bytes, concurrency: int, count: int,
                warmup: int = 20) -> tuple[list[float], float, int]:
    """``warmup`` calls one at a time, then ``count`` calls with ``concurrency`` in flight; (latencies ms, seconds,
    errors) of the ``count``."""
    import grpc

    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        for _ in range(warmup):
            await call(payload, timeout=30)
        remaining = count

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    await call(payload, timeout=30)
                    latencies.append((time.perf_counter() - started) * 1e3)
                except grpc.aio.AioRpcError:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started, errors


class Server:
    """A server under test: its process (:class:`~bench.harness.ServerProcess`, pinned to the server core), the
    model it serves, how to wait until it serves it, and (where its metrics say) the mean formed batch."""

    name = "server"

    def __init__(self, model: str) -> None:
        self.model = model
        self.port = free_port()
        self.process: ServerProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "launch() first"
        return self.process.pid

    def launch(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.process = ServerProcess(argv, log, env)

    def ready(self) -> None:
        """Until the server answers for its model (or RuntimeError, with its log's tail)."""
        raise NotImplementedError

    def check(self, shape: tuple[int, ...], onnx: Path) -> None:
        """That the server answers right (every server must be right, not only fast); AssertionError if not."""
        check_answers(self, shape, onnx)

    def mark(self) -> None:
        """Remember the batching counters now: :meth:`mean_batch` counts from here."""

    def mean_batch(self) -> float | None:
        """Mean samples per engine run since :meth:`mark` (None: this server does not say)."""
        return None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Edgeloop(Server):
    """``edgeloop edge serve`` on ``model`` (channel ``stable``, variant ``fp32``, one ONNX Runtime thread);
    ``max_batch`` 1 turns batching off; ``extra_env`` adds settings (``EDGE_*``)."""

    def __init__(self, s3: LocalS3, bucket: str, model: str, work: Path, max_batch: int,
                 extra_env: dict[str, str] | None = None, log_name: str = "edgeloop",
                 cache_name: str | None = None) -> None:
        super().__init__(model)
        self.name = "edgeloop" if max_batch > 1 else "edgeloop, batching off"
        self.metrics_port = free_port()
        env = {**os.environ, **s3.env(), "EDGELOOP_VERIFY_KEY_FILE": str(work / "keys" / "verify-key.pem"),
               "EDGE_MAX_BATCH_SIZE": str(max_batch), "EDGE_DEVICE_ID": "bench", "EDGE_VARIANT": "fp32",
               # one ONNX Runtime thread and no spinning, like every server here (measure() checks that no
               # thread left the server's core)
               "EDGE_ORT_INTRA_OP_THREADS": "1", "EDGE_ORT_SPIN_WAIT": "false",
               "EDGE_TELEMETRY_INTERVAL_S": "3600", **(extra_env or {})}
        cache = work / (cache_name or f"cache-{model}-{max_batch}")  # servers running side by side need their own
        self.launch([str(EDGELOOP), "edge", "serve", "--s3-endpoint", s3.endpoint_url, "--bucket", bucket,
                     "--model", model, "--version", "stable", "--cache-dir", str(cache), "--grpc-port",
                     str(self.port), "--metrics-port", str(self.metrics_port), "--log-level", "WARNING"],
                    work / f"{log_name}-{model}-{max_batch}.log", env)

    def ready(self) -> None:
        import tritonclient.grpc as triton

        assert self.process is not None
        self.process.wait_port(self.port)
        client = triton.InferenceServerClient(self.address)
        self.process.wait_for(client.is_server_ready, "edgeloop ready")

    def _histogram(self) -> tuple[float, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():  # edgeloop_batch_size_sum{model="..."} 123.0: summed over the models
            if line.startswith(("edgeloop_batch_size_sum", "edgeloop_batch_size_count")):
                name = line.split("{")[0].split()[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values.get("edgeloop_batch_size_sum", 0.0), values.get("edgeloop_batch_size_count", 0.0)

    def mark(self) -> None:
        self._mark = self._histogram()

    def mean_batch(self) -> float | None:
        total, runs = self._histogram()
        return (total - self._mark[0]) / max(runs - self._mark[1], 1)


KSERVE_MODEL = textwrap.dedent('''
    import argparse, numpy as np, onnxruntime as ort
    import kserve
    from kserve import InferResponse, InferOutput

    class OnnxModel(kserve.Model):
        def __init__(self, name, path):
            super().__init__(name)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.ready = True

        def predict(self, payload, headers=None):
            x = payload.inputs[0].as_numpy()
            (y,) = self.session.run(None, {"input": x})
            out = InferOutput(name="logits", shape=list(y.shape), datatype="FP32")
            out.set_data_from_numpy(y)
            return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)

    if __name__ == "__main__":
        parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
        parser.add_argument("--onnx")
        args, _ = parser.parse_known_args()
        model = OnnxModel(args.model_name, args.onnx)
        kserve.ModelServer(workers=1).start([model])
''')


class KServe(Server):
    name = "KServe 0.21"
    tuning: tuple[str, ...] = ()
    tag = "defaults"

    def __init__(self, model: str, onnx: Path, work: Path) -> None:
        super().__init__(model)
        script = work / "kserve_model.py"
        script.write_text(KSERVE_MODEL)
        self.launch([KSERVE_PYTHON, str(script), "--model_name", model, "--onnx", str(onnx), "--grpc_port",
                     str(self.port), "--http_port", str(free_port()), *self.tuning],
                    work / f"kserve-{self.tag}-{model}.log")

    def ready(self) -> None:
        assert self.process is not None
        self.process.wait_port(self.port)
        time.sleep(1.0)


class KServeTuned(KServe):
    """KServe as its users run it for speed: the log line it writes per request off (``--enable_latency_logging
    false``); the ÷ KServe column is against this one."""

    name = "KServe 0.21, tuned (latency logging off)"
    tuning = ("--enable_latency_logging", "false")
    tag = "tuned"


TRITON_MODEL = textwrap.dedent('''
    import numpy as np, onnxruntime as ort
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            self.session = ort.InferenceSession("ONNX_PATH", options, providers=["CPUExecutionProvider"])

        def execute(self, requests):
            xs = [pb_utils.get_input_tensor_by_name(r, "input").as_numpy() for r in requests]
            (y,) = self.session.run(None, {"input": np.concatenate(xs)})
            out, offset = [], 0
            for x in xs:
                part = y[offset: offset + len(x)]
                offset += len(x)
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", part)]))
            return out
''')


ECHO_SERVER = textwrap.dedent('''
    import asyncio, sys
    sys.path.insert(0, sys.argv[2])
    import grpc
    from edgeloop_core.protos import inference_pb2 as pb, inference_pb2_grpc

    class Echo(inference_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            for tensor in request.inputs:
                response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.extend(request.raw_input_contents)
            return response

    async def main(port):
        server = grpc.aio.server()
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main(int(sys.argv[1])))
''')


class EchoFloor(Server):
    """The Python floor: a bare grpc.aio server whose ModelInfer (Open Inference Protocol, protobuf decode and
    encode) returns its input, no model, no checks. What a Python gRPC server costs per request before it does
    anything; the builtin server's CPU per request is held against it."""

    name = "echo floor (bare grpc.aio)"

    def __init__(self, model: str, work: Path) -> None:
        super().__init__(model)
        script = work / "echo_server.py"
        script.write_text(ECHO_SERVER)
        self.launch([sys.executable, str(script), str(self.port), str(ROOT)], work / f"echo-{model}.log")

    def ready(self) -> None:
        assert self.process is not None
        self.process.wait_port(self.port)

    def check(self, shape: tuple[int, ...], onnx: Path) -> None:
        import tritonclient.grpc as triton

        x = np.random.default_rng(7).standard_normal((1, *shape)).astype(np.float32)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = triton.InferenceServerClient(self.address).infer(self.model, [tensor]).as_numpy("input")
        np.testing.assert_array_equal(got, x)


def wait_model_ready(server: Server, what: str, timeout_s: float = 180.0) -> None:
    """Until ``server`` says its model is ready (Triton's server readiness says nothing about one model);
    RuntimeError with its log's tail when it exits or ``timeout_s`` passes."""
    import tritonclient.grpc as triton

    assert server.process is not None
    server.process.wait_port(server.port, timeout_s)
    client = triton.InferenceServerClient(server.address)
    server.process.wait_for(lambda: client.is_model_ready(server.model), what, timeout_s, every_s=0.3)


def triton_counts(port: int) -> tuple[float, float]:
    """(successful requests, executions) from a Triton metrics endpoint; their ratio is the mean formed batch."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:  # a build without a metrics endpoint: the formed batch stays unknown
        return 0.0, 0.0
    requests = sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("nv_inference_request_success"))
    execs = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("nv_inference_exec_count"))
    return requests, execs


class Triton(Server):
    name = "Triton (Python backend)"

    def __init__(self, model: str, onnx: Path, shape: tuple[int, ...], work: Path, max_batch: int = 16) -> None:
        super().__init__(model)
        site = next(TRITON_VENV.glob("lib/python3*/site-packages"))
        home = site / "pytriton" / "tritonserver"
        repo = work / f"triton-repo-{model}"
        (repo / model / "1").mkdir(parents=True, exist_ok=True)
        (repo / model / "1" / "model.py").write_text(TRITON_MODEL.replace("ONNX_PATH", str(onnx)))
        dims = ", ".join(str(d) for d in shape)
        (repo / model / "config.pbtxt").write_text(
            f'name: "{model}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f'input [{{ name: "input" data_type: TYPE_FP32 dims: [{dims}] }}]\n'
            f'output [{{ name: "logits" data_type: TYPE_FP32 dims: [10] }}]\n'
            'dynamic_batching { max_queue_delay_microseconds: 500 }\n'
            'instance_group [{ count: 1 kind: KIND_CPU }]\n')
        backends = work / "triton-backends"
        if not backends.exists():
            shutil.copytree(home / "backends", backends)
            py = f"{sys.version_info.major}.{sys.version_info.minor}"
            shutil.copy(home / "python_backend_stubs" / py / "triton_python_backend_stub", backends / "python")
        import sysconfig

        libs = [str(site / "nvidia_pytriton.libs"), str(sysconfig.get_config_var("LIBDIR"))]
        env = {**os.environ, "LD_LIBRARY_PATH": ":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]),
               "PATH": f"{TRITON_VENV / 'bin'}:{os.environ['PATH']}"}
        self.metrics_port = free_port()
        self.launch([str(home / "bin" / "tritonserver"), f"--model-repository={repo}",
                     f"--backend-directory={backends}", f"--grpc-port={self.port}", f"--http-port={free_port()}",
                     f"--metrics-port={self.metrics_port}", "--log-verbose=0"], work / f"triton-{model}.log", env)

    def ready(self) -> None:
        wait_model_ready(self, "the model loaded")

    def _counts(self) -> tuple[float, float]:
        return triton_counts(self.metrics_port)

    def mark(self) -> None:
        self._mark = self._counts()

    def mean_batch(self) -> float | None:
        requests, execs = self._counts()
        if execs - self._mark[1] <= 0:
            return None
        return (requests - self._mark[0]) / (execs - self._mark[1])


class EdgeloopTriton(Edgeloop):
    """edgeloop as the control plane, Triton as the data plane (``EDGE_SERVING_ENGINE=triton``), configured as the
    Triton-alone server here: max batch 16, 500 µs queue delay, one instance, one ONNX Runtime thread. ``backend``
    runs the engine in Triton: edgeloop's own (in tritonserver's process) or Triton's Python backend (what Triton
    alone runs here)."""

    def __init__(self, s3: LocalS3, bucket: str, model: str, work: Path, max_batch: int = 16,
                 backend: str = "edgeloop") -> None:
        self.triton_metrics_port = free_port()
        self.backend = backend
        super().__init__(s3, bucket, model, work, max_batch, log_name=f"edgeloop-triton-{backend}", extra_env={
            "EDGE_SERVING_ENGINE": "triton", "EDGE_TRITON_PYTHON": str(TRITON_VENV / "bin" / "python"),
            "EDGE_TRITON_METRICS_PORT": str(self.triton_metrics_port), "EDGE_CONTROL_PORT": str(free_port()),
            "EDGE_MAX_QUEUE_DELAY_US": "500", "EDGE_TRITON_BACKEND": backend})
        self.name = EDGELOOP_TRITON[backend]

    def ready(self) -> None:
        """Triton is ready as soon as it is live (explicit model control); the model, once edgeloop validated it
        (and it is the backend this row is named after that serves it)."""
        import tritonclient.grpc as triton

        wait_model_ready(self, "the model validated and served")
        config = triton.InferenceServerClient(self.address).get_model_config(self.model, as_json=True)["config"]
        if config.get("backend") != self.backend:
            raise RuntimeError(f"served by Triton's {config.get('backend')} backend, not {self.backend}")

    def _counts(self) -> tuple[float, float]:  # Triton's counters give the formed batch
        return triton_counts(self.triton_metrics_port)

    mark = Triton.mark
    mean_batch = Triton.mean_batch


EDGELOOP_TRITON = {"edgeloop": "edgeloop + Triton", "python": "edgeloop + Triton (Python backend)"}


def ort_session(path: Path):  # noqa: ANN201 - onnxruntime.InferenceSession
    """An ONNX Runtime session as every server here runs it: one intra-op and one inter-op thread, no spinning
    (given no thread count, ONNX Runtime pins a worker to every core of the machine, past taskset)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def in_process_ort(path: Path, shape: tuple[int, ...]) -> tuple[float, float]:
    """Samples/s of ONNX Runtime in this process on the server core: batch 1, and the best of batch 16. After its
    warm-up, this thread and every thread the session started must be on the server core (:class:`NotPinnedError`)."""
    with on_core(SERVER_CORE):
        before = set(thread_affinities(os.getpid()))
        session = ort_session(path)
        rates = []
        for batch in (1, 16):
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            for _ in range(20):
                session.run(None, {"input": x})
            mine = {t: c for t, c in thread_affinities(os.getpid()).items()
                    if t not in before or t.startswith(f"{os.getpid()}/{threading.get_native_id()} ")}
            escaped = {t: sorted(c) for t, c in mine.items() if c != {SERVER_CORE}}
            if escaped:
                raise NotPinnedError(f"in-process ONNX Runtime: threads off core {SERVER_CORE}: {escaped}")
            runs, started = 0, time.perf_counter()
            while time.perf_counter() - started < 2.0:
                session.run(None, {"input": x})
                runs += 1
            rates.append(runs * batch / (time.perf_counter() - started))
        return rates[0], rates[1]


def check_answers(server: Server, shape: tuple[int, ...], onnx: Path) -> None:
    """tritonclient gets the same logits as ONNX Runtime on the file (every server must be right, not only fast)."""
    import tritonclient.grpc as triton

    x = np.random.default_rng(7).standard_normal((1, *shape)).astype(np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = triton.InferenceServerClient(server.address).infer(server.model, [tensor]).as_numpy("logits")
    (expected,) = ort_session(onnx).run(None, {"input": x})
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def measure(server: Server, payload: bytes, levels: list[int], count: int) -> list[dict]:
    """At each concurrency of ``levels``: a warm-up at that level, then ``count`` measured calls; one row each.
    After each warm-up every thread of the server's process tree must be on the server core (:class:`NotPinnedError`
    stops the run: a thread elsewhere would be a second core); the row keeps how many threads were checked."""
    rows = []
    for concurrency in levels:
        # warm up at this level (as perf_analyzer does), so what is measured is the steady state at this load, for
        # every server alike: caches warm, batchers settled
        asyncio.run(drive(server.address, payload, concurrency, max(100, count // 10)))
        threads = verify_pinned(server.pid, {SERVER_CORE}, server.name)
        server.mark()
        cpu_before = cpu_seconds(server.pid)
        latencies, seconds, errors = asyncio.run(drive(server.address, payload, concurrency, count, warmup=0))
        cpu = cpu_seconds(server.pid) - cpu_before
        done = len(latencies)
        rows.append({"server": server.name, "concurrency": concurrency, "rps": done / seconds,
                     "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
                     "cpu_us": cpu / max(done, 1) * 1e6, "batch": server.mean_batch(), "errors": errors,
                     "threads": threads})
        print(f"  {server.name:26s} c={concurrency:<3d} {rows[-1]['rps']:8.0f} req/s  p50 {rows[-1]['p50']:.2f} ms  "
              f"cpu/req {rows[-1]['cpu_us']:.0f} µs  batch {rows[-1]['batch'] or '-'}  errors {errors}", flush=True)
    return rows


AREAS = (("Handle._run (asyncio/events.py", "gRPC and protobuf C code run by the event loop"),
         ("Thread.run (threading.py", "gRPC poller thread (C)"), ("selectors.py", "event-loop poll"),
         ("_write_to_self", "engine thread hand-off"),
         ("grpc/_cython", "grpc core (C)"), ("grpc/aio", "grpc.aio"), ("google/protobuf", "protobuf"),
         ("asyncio", "asyncio"), ("onnxruntime", "ONNX Runtime"), ("edge_runtime/serve", "edgeloop serve"),
         ("edge_runtime/report/capture", "field capture"), ("pyarrow", "pyarrow (capture)"),
         ("edge_runtime", "edgeloop other"), ("prometheus_client", "metrics"), ("numpy", "numpy"),
         ("concurrent/futures", "engine thread hand-off"), ("threading", "engine thread hand-off"))


Profile = tuple[list[tuple[str, float]], list[tuple[str, float]]]


def profile(server: Server, payload: bytes, concurrency: int, work: Path) -> Profile:
    """Sample the server with py-spy under load. Returns the share of the server's CPU per thread (from /proc: what
    each thread really used) and the share of py-spy samples per area (by the innermost known frame: a sample whose
    innermost Python frame is the event loop running a callback is C code of gRPC or protobuf, one whose innermost is
    a bare ``Thread.run`` is gRPC's poller thread). On one core py-spy samples every runnable thread, running or
    waiting for the core, so its shares are of time spent, not of CPU."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = work / "profile.txt"
    recorder = subprocess.Popen([spy, "record", "-p", str(server.pid), "-d", "6", "-r", "250", "-f", "raw",
                                 "-o", str(out), "--nonblocking", "--subprocesses", "--threads"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    before, deadline = thread_cpu(server.pid), time.monotonic() + 6
    while time.monotonic() < deadline:
        asyncio.run(drive(server.address, payload, concurrency, 1000))
    after = thread_cpu(server.pid)
    recorder.wait(30)
    text = out.read_text() if out.exists() else ""
    names = dict(re.findall(r"thread \((\d+)\): ([^;]+?)(?: \(|;)", text))  # py-spy's "thread (tid): name"
    used: dict[str, float] = {}
    for tid, (comm, seconds) in after.items():
        name = re.sub(r"_\d+$", "", names.get(str(tid), comm))  # edgeloop-engine_0: the engine thread
        used[name] = used.get(name, 0.0) + seconds - before.get(tid, (comm, 0.0))[1]
    spent = sum(used.values()) or 1.0
    threads = sorted(((n, u / spent) for n, u in used.items() if u > 0), key=lambda kv: -kv[1])
    counts: dict[str, float] = {}
    total = 0.0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        area = next((name for frame in reversed(frames) for key, name in AREAS if key in frame), "other")
        counts[area] = counts.get(area, 0.0) + float(n)
        total += float(n)
    return threads, sorted(((a, c / total) for a, c in counts.items()), key=lambda kv: -kv[1]) if total else []


def shared_memory_vs_bytes(edge: Edgeloop, count: int, concurrency: int = 8) -> dict[str, float]:
    """req/s for a 3×224×224 FP32 input as protobuf bytes and through system shared memory (edgeloop)."""
    import tritonclient.utils.shared_memory as shm

    from edgeloop_core.protos import inference_pb2 as pb

    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    as_bytes = pb.ModelInferRequest(model_name=edge.model)
    as_bytes.inputs.add(name="input", datatype="FP32", shape=x.shape)
    as_bytes.raw_input_contents.append(x.tobytes())
    handle = shm.create_shared_memory_region("frame", "/edgeloop_bench_frame", x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(edge.address)
    client.register_system_shared_memory("frame", "/edgeloop_bench_frame", x.nbytes)
    via_shm = pb.ModelInferRequest(model_name=edge.model)
    tensor = via_shm.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.parameters["shared_memory_region"].string_param = "frame"
    tensor.parameters["shared_memory_byte_size"].int64_param = x.nbytes
    try:
        result = {}
        for label, request in (("protobuf bytes", as_bytes), ("shared memory", via_shm)):
            asyncio.run(drive(edge.address, request.SerializeToString(), concurrency, max(100, count // 10)))
            latencies, seconds, _ = asyncio.run(drive(edge.address, request.SerializeToString(), concurrency, count,
                                                      warmup=0))
            result[label] = len(latencies) / seconds
        return result
    finally:
        client.unregister_system_shared_memory("frame")
        shm.destroy_shared_memory_region(handle)


def publish_fp32(store: ObjectStore, work: Path, name: str, onnx: Path, shape: tuple[int, ...],
                 samples: int = 32) -> None:
    """Publish ``onnx`` as version ``v1`` of ``name`` on channel ``stable`` (one FP32 variant, validated by output
    agreement on ``samples`` random inputs), signed with the benchmark's key."""
    from datetime import datetime, timezone

    from components.publish import publish_version
    from edgeloop_core.contract import (
        ArtifactLayout,
        Manifest,
        TensorSpec,
        Validation,
        Variant,
        load_signing_key,
        sha256_file,
    )

    stage = work / f"stage-{name}"
    stage.mkdir()
    shutil.copy(onnx, stage / "fp32.onnx")
    x = np.random.default_rng(0).standard_normal((samples, *shape)).astype(np.float32)
    (y,) = ort_session(onnx).run(None, {"input": x})
    np.savez(stage / "validation.npz", **{"input:input": x, "reference:logits": y})
    ref = {f: dict(zip(("sha256", "size_bytes"), sha256_file(stage / f), strict=True))
           for f in ("fp32.onnx", "validation.npz")}
    manifest = Manifest(
        name=name, version="v1", created_at=datetime.now(timezone.utc),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, *shape])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
        variants=[Variant(file="fp32.onnx", name="fp32", precision="fp32", backends=["tensorrt", "onnxruntime"],
                          **ref["fp32.onnx"])],
        validation=Validation(file="validation.npz", metric="output_agreement", num_samples=samples,
                              reference={"fp32": 1.0}, tolerance=0.01, **ref["validation.npz"]))
    publish_version(store, manifest, stage, load_signing_key(work / "keys" / "signing-key.pem"),
                    layout=ArtifactLayout(), channel="stable")


def servers_for(model: str, onnx: Path, shape: tuple[int, ...], wanted: set[str], s3: LocalS3, work: Path,
                max_batch: int, skipped: list[str]) -> list[Callable[[], Server]]:
    """How to start each wanted server for ``model`` (started one at a time, each stopped before the next); a
    server that cannot run here goes to ``skipped`` with what to do about it."""
    makers: list[Callable[[], Server]] = []
    if "edgeloop" in wanted:
        makers.append(lambda: Edgeloop(s3, "bench", model, work, max_batch))
    if "edgeloop-nobatch" in wanted:
        makers.append(lambda: Edgeloop(s3, "bench", model, work, 1))
    for key, backend in (("edgeloop-triton", "edgeloop"), ("edgeloop-triton-python", "python")):
        if key not in wanted:
            continue
        if TRITON_VENV.exists():
            makers.append(lambda b=backend: EdgeloopTriton(s3, "bench", model, work, max_batch, b))
        else:
            skipped.append(f"{EDGELOOP_TRITON[backend]}: no {TRITON_VENV} (make test creates .tools/triton)")
    if "kserve" in wanted:
        if Path(KSERVE_PYTHON).exists():
            makers.append(lambda: KServe(model, onnx, work))
            makers.append(lambda: KServeTuned(model, onnx, work))
        else:
            skipped.append(f"KServe: no {KSERVE_PYTHON} (python -m venv /tmp/kserve-venv && "
                           f"/tmp/kserve-venv/bin/pip install kserve onnxruntime)")
    if "echo" in wanted:
        makers.append(lambda: EchoFloor(model, work))
    if "triton" in wanted:
        if TRITON_VENV.exists():
            makers.append(lambda: Triton(model, onnx, shape, work, max_batch))
        else:
            skipped.append(f"Triton: no {TRITON_VENV} (a venv with nvidia-pytriton, numpy<2, onnxruntime)")
    return makers


def shared_memory_run(s3: LocalS3, store: ObjectStore, work: Path, requests: int) -> dict[str, float]:
    """Publish a 3×224×224 model and time it through protobuf bytes and through shared memory (edgeloop)."""
    from torch import nn

    from components.export import export_onnx

    onnx224 = work / "image224.onnx"
    export_onnx(nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 10)).eval(), onnx224, (3, 224, 224))
    publish_fp32(store, work, "image", onnx224, (3, 224, 224), samples=8)
    edge = Edgeloop(s3, "bench", "image", work, 16)
    try:
        edge.ready()
        result = shared_memory_vs_bytes(edge, min(requests, 1000))
    finally:
        edge.stop()
    print(f"3x224x224 FP32 at c=8: {result}", flush=True)
    return result


CAPTURE_RATES: tuple[tuple[str, float | None], ...] = (("off", None), ("1%", 0.01), ("100%", 1.0))
"""The capture rows (issue 26): the builtin server with its model's capture off, sampling 1% and 100% of requests."""
CAPTURE_MODEL, CAPTURE_LEVEL = "small", 32
CAPTURE_TARGETS = {"1%": 0.95, "100%": 0.70}
"""Least req/s of a capture row ÷ capture off's, same run (issue 26: capture at 1% costs ≤ 5% of throughput, at 100%
≤ 30%)."""
CAPTURE_SHARD_AGE_S = 60.0
"""Longest a spooled item waits for its shard, seconds, in the capture rows: the default, as devices run. (At 2 s,
1% sampling rolled and uploaded a tiny shard every 2 s on the server's core and cost ~5% of throughput, not the
sampling.) The rows then wait for 1%'s last shard to go home after the rounds; every other capture setting is at its
default."""


class CaptureEdgeloop(Edgeloop):
    """The builtin server (defaults, batching on) whose desired file (``EDGE_DESIRED_FILE``) names ``model`` with a
    capture policy sampling ``rate`` of its requests and no budgets (the defaults, 600 items an hour, would refuse
    almost all of 100%), or none (``rate`` None: the same file, capture off). Its own
    cache and spool, and its own device id (``bench-capture-<tag>``): its shards in the benchmark's SeaweedFS, the
    store it fetched the model from, are its own."""

    def __init__(self, s3: LocalS3, bucket: str, model: str, work: Path, max_batch: int, label: str,
                 rate: float | None) -> None:
        tag = label.replace("%", "pct")
        entry: dict[str, object] = {"name": model, "version": "stable"}
        if rate is not None:
            entry["capture"] = {"sample_rate": rate, "items_per_hour": None, "bytes_per_day": None}
        desired = work / f"desired-capture-{tag}.json"
        desired.write_text(json.dumps({"models": [entry], "capture": {"shard_max_age_s": CAPTURE_SHARD_AGE_S}}))
        self.label, self.rate, self.device = label, rate, f"bench-capture-{tag}"
        super().__init__(s3, bucket, model, work, max_batch, log_name=f"edgeloop-capture-{tag}",
                         cache_name=f"cache-capture-{tag}",
                         extra_env={"EDGE_DESIRED_FILE": str(desired), "EDGE_DEVICE_ID": self.device})
        self.name = f"edgeloop, capture {label}"

    def counters(self) -> dict[str, float]:
        """This server's capture counters now (:func:`capture_counters` of its Prometheus endpoint)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return capture_counters(text, self.model)

    def settled(self, timeout_s: float = 10.0) -> dict[str, float]:
        """:meth:`counters` once the capture worker has judged what was queued (captured and dropped unchanged over
        0.3 s, at most ``timeout_s``): a round's counts belong to that round."""
        deadline, last = time.monotonic() + timeout_s, self.counters()
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.counters()
            if now == last:
                break
            last = now
        return last


def capture_counters(text: str, model: str) -> dict[str, float]:
    """From an edgeloop Prometheus page: ``served`` (ModelInfer answered OK for ``model``), ``captured``
    (``edgeloop_capture_items_total`` of ``model``, all policies), ``dropped:<reason>``
    (``edgeloop_capture_dropped_total`` of ``model``), ``uploaded`` (items in shards sent to S3) and ``shards``."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {"served": 0.0, "captured": 0.0, "uploaded": 0.0, "shards": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "edgeloop_requests_total" and labels.get("model") == model \
                    and labels.get("code") == "OK":
                found["served"] += sample.value
            elif sample.name == "edgeloop_capture_items_total" and labels.get("model") == model:
                found["captured"] += sample.value
            elif sample.name == "edgeloop_capture_dropped_total" and labels.get("model") == model:
                key = f"dropped:{labels.get('reason', '')}"
                found[key] = found.get(key, 0.0) + sample.value
            elif sample.name == "edgeloop_capture_uploaded_total" and labels.get("kind") in ("items", "shards"):
                found["uploaded" if labels["kind"] == "items" else "shards"] += sample.value
    return found


def capture_run(s3: LocalS3, store: ObjectStore, work: Path, onnx: Path, shape: tuple[int, ...], payload: bytes,
                requests: int, rounds: int, max_batch: int, profiled: bool = False) -> list[dict]:
    """The capture rows: the three servers of :data:`CAPTURE_RATES` run side by side on the server core (idle but
    for the one measured), warmed up by one round each that is not measured, then measured in turn, ``rounds`` times
    (off, 1%, 100%, off, ...), so that a machine's
    drift hits all three alike; each row is its median round, with the capture counters summed over its rounds
    (warm-ups included) and what went home to S3 by the end; ``profiled``: py-spy the 100% server afterwards
    (:func:`profile`). Publishes nothing: the model must be on ``stable``."""
    servers: list[CaptureEdgeloop] = []
    try:
        for label, rate in CAPTURE_RATES:
            servers.append(CaptureEdgeloop(s3, "bench", CAPTURE_MODEL, work, max_batch, label, rate))
            servers[-1].ready()
            servers[-1].check(shape, onnx)
        runs: dict[str, list[dict]] = {s.label: [] for s in servers}
        counts: dict[str, dict[str, float]] = {s.label: {} for s in servers}
        for server in servers:  # a round not measured: a capture server's first items pay for its first shard
            measure(server, payload, [CAPTURE_LEVEL], requests)
        for _ in range(rounds):
            for server in servers:
                before = server.settled()
                runs[server.label] += measure(server, payload, [CAPTURE_LEVEL], requests)
                after = server.settled()
                for key, value in after.items():
                    counts[server.label][key] = counts[server.label].get(key, 0.0) + value - before.get(key, 0.0)
        rows = [capture_row(server, runs[server.label], counts[server.label], store) for server in servers]
        if profiled:
            rows[-1]["profile"] = profile(servers[-1], payload, CAPTURE_LEVEL, work)
        return rows
    finally:
        for server in servers:
            server.stop()


def capture_row(server: CaptureEdgeloop, runs: list[dict], counts: dict[str, float], store: ObjectStore) -> dict:
    """One capture row: the median round of ``runs``, the counters of all of them, and what is home in ``store``
    once the server uploaded every item it captured (waits up to :data:`CAPTURE_SHARD_AGE_S` + 30 s for its last
    shard)."""
    deadline = time.monotonic() + CAPTURE_SHARD_AGE_S + 30
    final = server.counters()
    while final["uploaded"] < final["captured"] - final.get("dropped:spool_full", 0) and time.monotonic() < deadline:
        time.sleep(0.5)
        final = server.counters()
    shards = [k for k in store.list_keys(f"captures/{server.device}/models/") if k.endswith(".parquet")]
    median = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    return {**median, "model": CAPTURE_MODEL, "capture": server.label, "rounds": [r["rps"] for r in runs],
            "counts": counts, "uploaded": final["uploaded"], "captured_total": final["captured"],
            "shards_in_s3": len(shards), "device": server.device}


def capture_tables(rows: list[dict], rounds: int) -> str:
    """The capture table, issue 26's targets with PASS or FAIL from the run's own rows, and what was dropped."""
    if not rows:
        return ""
    off = next((r for r in rows if r["capture"] == "off"), None)
    lines = ["| model | capture | c | req/s | ÷ capture off | p50 ms | p99 ms | server CPU µs/req | requests served | "
             "captured | dropped (by reason) | uploaded ÷ captured items, whole run (shards in S3) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        c = r["counts"]
        ratio = f"{r['rps'] / off['rps']:.2f}x" if off else ""
        lines.append(f"| {r['model']} | {r['capture']} | {r['concurrency']} | {r['rps']:.0f} | {ratio} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} | {r['cpu_us']:.0f} | {c.get('served', 0):.0f} | "
                     f"{c.get('captured', 0):.0f} | {dropped_text(c)} | {r['uploaded']:.0f} ÷ "
                     f"{r['captured_total']:.0f} ({r['shards_in_s3']}) |")
    lines.append("")
    lines.extend(capture_acceptance(rows))
    lines.append(f"- capture rows: the builtin server on the {CAPTURE_MODEL} model at c={CAPTURE_LEVEL}, three servers "
                 f"side by side on core {SERVER_CORE} (capture off: the same desired file without a capture policy), "
                 f"measured in turn over {rounds} round(s); req/s is each one's median round ("
                 + "; ".join(f"{r['capture']}: " + "/".join(f"{v:.0f}" for v in r["rounds"]) for r in rows)
                 + "); counts are summed over the rounds, warm-ups included, from each server's Prometheus "
                 f"metrics; spooled items wait at most {CAPTURE_SHARD_AGE_S:g} s for their shard, then go to the "
                 f"benchmark's SeaweedFS under captures/<device>/")
    for r in rows:
        if "profile" in r:
            threads, shares = r["profile"]
            lines.append(f"- where the server's CPU goes with capture at {r['capture']} ({r['model']}, "
                         f"c={r['concurrency']}): by thread (/proc) "
                         + ", ".join(f"{name} {share:.0%}" for name, share in threads[:6])
                         + "; py-spy samples (runnable threads, not CPU) "
                         + ", ".join(f"{area} {share:.0%}" for area, share in shares[:8]))
    return "\n".join(lines)


def dropped_text(counts: dict[str, float]) -> str:
    """``queue_full 1234, spool_full 5``, or ``0``."""
    drops = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("dropped:") and v}
    return ", ".join(f"{reason} {n:.0f}" for reason, n in sorted(drops.items())) or "0"


def capture_acceptance(rows: list[dict]) -> list[str]:
    """Issue 26's targets (PASS, FAIL or "not measured"), and whether 100% captured every request or dropped some at
    the queue (by design: serving never waits on capture)."""
    at = {r["capture"]: r for r in rows}
    off = at.get("off")
    lines = []
    for label, least in CAPTURE_TARGETS.items():
        row = at.get(label)
        ratio = row["rps"] / off["rps"] if row and off else None
        said = f"{ratio:.2f}x capture off's req/s, same run" if ratio is not None else "no rows"
        lines.append(f"- target, capture at {label} ({CAPTURE_MODEL} model, c={CAPTURE_LEVEL}): costs ≤ "
                     f"{1 - least:.0%} of throughput (≥ {least:.2f}x capture off): "
                     f"{_verdict(None if ratio is None else ratio >= least)} ({said})")
    full = at.get("100%")
    if full:
        c = full["counts"]
        served, captured = c.get("served", 0.0), c.get("captured", 0.0)
        queue_full = c.get("dropped:queue_full", 0.0)
        how = ("captured every request" if captured >= served else
               f"captured {captured / max(served, 1):.1%} of the requests")
        lines.append(f"- capture at 100%: {how} ({captured:.0f} of {served:.0f}); dropped: {dropped_text(c)}. "
                     + (f"The {queue_full:.0f} dropped at the queue are the design: the request path never waits on "
                        f"capture, a full queue (256 requests) drops and counts; " if queue_full else "")
                     + f"{full['uploaded']:.0f} of the {full['captured_total']:.0f} items it captured in the whole "
                       f"run (the answer check included) went home to S3, in {full['shards_in_s3']} shard(s)")
    return lines


def tables(rows: list[dict], ceilings: dict[str, tuple[float, float]], levels: list[int],
           shm_result: dict[str, float], skipped: list[str], profiles: dict[str, Profile]) -> str:
    """The markdown table and the notes under it."""
    kserve = {(r["model"], r["concurrency"]): r["rps"] for r in rows if r["server"] == KServeTuned.name}
    lines = ["| model | server | c | req/s | p50 ms | p99 ms | server CPU µs/req | mean batch | ÷ KServe | "
             "÷ in-process ORT |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        k = kserve.get((r["model"], r["concurrency"]))
        batch = "" if r["batch"] is None else f"{r['batch']:.1f}"
        versus = f"{r['rps'] / k:.2f}x" if k else ""
        ort = "" if r["server"] == EchoFloor.name else f"{r['rps'] / max(ceilings[r['model']]):.2f}"
        lines.append(f"| {r['model']} | {r['server']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50']:.2f} | "
                     f"{r['p99']:.2f} | {r['cpu_us']:.0f} | {batch} | {versus} | {ort} |")
    lines.append("")
    lines.extend(acceptance(rows, ceilings))
    lines.append(pinning(rows))
    for model, (b1, b16) in ceilings.items():
        lines.append(f"- in-process ONNX Runtime, one core, {model}: {b1:.0f} samples/s at batch 1, {b16:.0f} at "
                     f"batch 16 (÷ in-process ORT is against the better of the two)")
    rps = {(r["model"], r["server"], r["concurrency"]): r["rps"] for r in rows}
    c = max(levels)
    for model in ceilings:
        alone, ks = rps.get((model, Triton.name, c)), kserve.get((model, c))
        for backend, how in (("python", "same model, backend and batching"),
                             ("edgeloop", "same model and batching, edgeloop's backend")):
            ours = rps.get((model, EDGELOOP_TRITON[backend], c))
            if ours and (alone or ks):
                versus = [f"{ours / alone:.2f}x what Triton alone serves ({how})" if alone else "",
                          f"{ours / ks:.2f}x KServe" if ks else ""]
                lines.append(f"- {model}, c={c}: {EDGELOOP_TRITON[backend]} serves "
                             + ", ".join(v for v in versus if v))
    for model in ceilings:  # what dynamic batching buys: the builtin server with and without it
        ratios = [f"{rps[(model, 'edgeloop', level)] / rps[(model, 'edgeloop, batching off', level)]:.2f}x at "
                  f"c={level}" for level in levels
                  if (model, "edgeloop", level) in rps and (model, "edgeloop, batching off", level) in rps]
        if ratios:
            lines.append(f"- {model}: dynamic batching ÷ batching off (edgeloop): {', '.join(ratios)}")
    if shm_result:
        ratio = shm_result["shared memory"] / max(shm_result["protobuf bytes"], 1e-9)
        lines.append(f"- 3×224×224 FP32 input at c=8 (edgeloop): {shm_result['protobuf bytes']:.0f} req/s as protobuf "
                     f"bytes, {shm_result['shared memory']:.0f} req/s through shared memory ({ratio:.2f}x)")
    for reason in skipped:
        lines.append(f"- skipped: {reason}")
    for model, (threads, shares) in profiles.items():
        by_thread = ", ".join(f"{name} {share:.0%}" for name, share in threads[:6])
        top = ", ".join(f"{area} {share:.0%}" for area, share in shares[:8])
        lines.append(f"- where edgeloop's server CPU goes ({model}, c={c}): by thread (/proc) {by_thread}; py-spy "
                     f"samples (runnable threads, not CPU) {top}")
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "FAIL")


def acceptance(rows: list[dict], ceilings: dict[str, tuple[float, float]]) -> list[str]:
    """Issue 25's targets for the builtin server, each with PASS, FAIL or "not measured" (a row the run lacks)."""
    at = {(r["model"], r["server"], r["concurrency"]): r for r in rows}
    ours, tuned, echo = (lambda m, c: at.get((m, "edgeloop", c))), (lambda m, c: at.get((m, KServeTuned.name, c))), \
        (lambda m, c: at.get((m, EchoFloor.name, c)))
    lines = []
    e, k, f = ours("small", 32), tuned("small", 32), echo("small", 32)
    ratio = e["rps"] / k["rps"] if e and k else None
    cpu = e["cpu_us"] / f["cpu_us"] if e and f else None
    ok = None if ratio is None and cpu is None else bool((ratio or 0) >= 1.8 or (cpu or 99) <= 1.25)
    lines.append(f"- target, small model at c=32: ≥ 1.8x tuned KServe or ≤ 1.25x the echo floor's CPU per request: "
                 f"{_verdict(ok)} ({f'{ratio:.2f}x tuned KServe' if ratio else 'no KServe row'}; "
                 f"{f'{cpu:.2f}x the echo floor CPU/req' if cpu else 'no echo row'})")
    e, k = ours("small", 1), tuned("small", 1)
    ok = None if not (e and k) else e["p50"] <= k["p50"] and e["p99"] <= 1.2
    said = f"p50 {e['p50']:.2f} ms against {k['p50']:.2f} ms, p99 {e['p99']:.2f} ms" if e and k else "no c=1 rows"
    lines.append(f"- target, a lone request (small model, c=1): p50 ≤ tuned KServe's and p99 ≤ 1.2 ms: {_verdict(ok)} "
                 f"({said})")
    e = ours("large", 32)
    best = max(ceilings["large"]) if "large" in ceilings else None
    ok = None if not (e and best) else e["rps"] >= 0.85 * best and e["p99"] <= 1.5 * e["p50"]
    said = (f"{e['rps'] / best:.3f}x, p99 {e['p99'] / e['p50']:.2f}x p50" if e and best else "no large c=32 row")
    lines.append(f"- target, large model at c=32: ≥ 0.85x in-process ORT and p99 ≤ 1.5x p50: {_verdict(ok)} ({said})")
    for model in ceilings:
        plus, alone = at.get((model, EDGELOOP_TRITON["edgeloop"], 32)), at.get((model, Triton.name, 32))
        ok = None if not (plus and alone) else plus["rps"] >= 1.1 * alone["rps"]
        said = f"{plus['rps'] / alone['rps']:.2f}x" if plus and alone else "no rows"
        reach = max(ceilings[model]) / alone["rps"] if alone else None
        if ok is False and reach is not None and reach < 1.1:  # compute-bound: not even the model alone gets there
            lines.append(f"- target, {model} model at c=32: edgeloop + Triton ≥ 1.1x Triton alone: OUT OF REACH "
                         f"({said}; in-process ONNX Runtime itself, the most any server can serve, is {reach:.3f}x "
                         f"Triton alone on this compute-bound model, and batching does not raise it)")
            continue
        lines.append(f"- target, {model} model at c=32: edgeloop + Triton ≥ 1.1x Triton alone: {_verdict(ok)} "
                     f"({said})")
    return lines


def pinning(rows: list[dict]) -> str:
    """The line that says the pinning was checked, and on how many threads."""
    most: dict[str, int] = {}
    for r in rows:
        most[r["server"]] = max(most.get(r["server"], 0), r["threads"])
    counted = ", ".join(f"{name} {n}" for name, n in most.items())
    return (f"- pinning verified: every server runs ONNX Runtime with one intra-op and one inter-op thread, spinning "
            f"off; after each warm-up every thread of every server process (children included) was allowed core "
            f"{SERVER_CORE} only (/proc/<pid>/task/*/status), as was in-process ORT's; threads checked: {counted}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", help=f"concurrencies (default {FULL['levels']}; --quick: {QUICK['levels']})")
    parser.add_argument("--requests", type=int,
                        help=f"measured calls per level (default {FULL['requests']}; --quick: {QUICK['requests']})")
    parser.add_argument("--servers",
                        default="edgeloop,edgeloop-nobatch,edgeloop-triton,edgeloop-triton-python,kserve,triton,echo,"
                                "edgeloop-capture")
    parser.add_argument("--models", help=f"default {FULL['models']}; --quick: {QUICK['models']}")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="largest batch of every batching server (edgeloop, edgeloop + Triton, Triton)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the edgeloop server at the highest concurrency and print where its CPU goes")
    parser.add_argument("--capture-rounds", type=int,
                        help="rounds of the capture rows (edgeloop-capture: off, 1%%, 100%% measured in turn; "
                             f"default {FULL['capture_rounds']}; --quick: {QUICK['capture_rounds']})")
    BenchRun.add_options(parser, "serve")
    args = parser.parse_args()
    run = BenchRun.from_args("serve", args, parser)
    defaults = QUICK if args.quick else FULL
    levels = [int(v) for v in (args.levels or defaults["levels"]).split(",")]
    requests = args.requests or defaults["requests"]
    wanted = set(args.servers.split(","))
    pin_load_generator("the server")

    rows: list[dict] = []
    ceilings: dict[str, tuple[float, float]] = {}
    skipped: list[str] = []
    shm_result: dict[str, float] = {}
    profiles: dict[str, Profile] = {}
    capture_rows: list[dict] = []
    rounds = args.capture_rounds or defaults["capture_rounds"]
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-serve-") as tmp:
        work = Path(tmp)
        models = build_models(work)
        with local_store(work) as (s3, store):
            for model in (args.models or defaults["models"]).split(","):
                onnx, shape = models[model]
                publish_fp32(store, work, model, onnx, shape)
                ceilings[model] = in_process_ort(onnx, shape)
                print(f"{model}: in-process ONNX Runtime on one core: {ceilings[model][0]:.0f} samples/s at batch 1, "
                      f"{ceilings[model][1]:.0f} at batch 16", flush=True)
                payload = request_bytes(model, shape)
                for make in servers_for(model, onnx, shape, wanted, s3, work, args.max_batch, skipped):
                    server = make()
                    try:
                        server.ready()
                        server.check(shape, onnx)
                        for row in measure(server, payload, levels, requests):
                            rows.append({**row, "model": model})
                        if args.profile and server.name == "edgeloop":
                            profiles[model] = profile(server, payload, max(levels), work)
                    except NotPinnedError:  # not a server's failure: the comparison itself is void
                        raise
                    except Exception as exc:  # noqa: BLE001 - a server that fails here is reported, not fatal
                        skipped.append(f"{server.name} ({model}): {type(exc).__name__}: {exc}")
                    finally:
                        server.stop()
            if "edgeloop-capture" in wanted and CAPTURE_MODEL in ceilings:
                onnx, shape = models[CAPTURE_MODEL]
                try:
                    capture_rows = capture_run(s3, store, work, onnx, shape, request_bytes(CAPTURE_MODEL, shape),
                                               requests, rounds, args.max_batch, profiled=args.profile)
                except NotPinnedError:
                    raise
                except Exception as exc:  # noqa: BLE001 - reported with the other skipped servers
                    skipped.append(f"edgeloop capture rows: {type(exc).__name__}: {exc}")
            elif "edgeloop-capture" in wanted:
                skipped.append(f"edgeloop capture rows: they run on the {CAPTURE_MODEL} model (--models)")
            if "edgeloop" in wanted:
                shm_result = shared_memory_run(s3, store, work, requests)

    table = tables(rows, ceilings, levels, shm_result, skipped, profiles)
    if capture_rows:
        table += "\n\n" + capture_tables(capture_rows, rounds)
    print(table)
    write_plot(rows, run.plot)
    run.finish(table)


def write_plot(rows: list[dict], path: Path) -> None:
    """Requests/s against concurrency, a line per server, a panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for server in dict.fromkeys(r["server"] for r in rows if r["model"] == model):
            mine = [r for r in rows if r["model"] == model and r["server"] == server]
            ax.plot([r["concurrency"] for r in mine], [r["rps"] for r in mine], marker="o", label=server)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("requests/s (server on one core)")
        ax.set_title(model)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    try:
        main()
    except NotPinnedError as exc:  # the comparison is void: say why in one line, write nothing
        sys.exit(f"error: {exc}")
