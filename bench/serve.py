"""Serving benchmark: edgeloop against the servers users would pick instead, on the same ONNX file and the same cores.

    .venv/bin/python bench/serve.py [--levels 1,8,32] [--requests 2000] [--servers edgeloop,kserve,triton]
                                    [--models small,large] [--profile] [--quick] [--readme PATH] [--plot PATH]

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
* **in-process ONNX Runtime** on the same core: the ceiling.

Reported per server, model and concurrency: requests/s, p50/p99 ms, server CPU per request (from /proc, the whole
process tree), mean formed batch (edgeloop's and Triton's metrics), and ratios against KServe and in-process ORT;
then dynamic batching against batching off, and a 3×224×224 FP32 input through protobuf bytes against system shared
memory (edgeloop). Writes its section of ``bench/README.md`` (``bench/report.py``) and a plot; ``--quick`` runs the
small model at two levels with few requests and writes into a copy of the README. Never part of the test run;
servers missing here are skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
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
    ServerProcess,
    cpu_seconds,
    free_port,
    local_store,
    on_core,
    pin_load_generator,
)
from bench.report import BenchRun  # noqa: E402

if TYPE_CHECKING:
    from edgeloop.local_s3 import LocalS3
    from edgeloop_core.store import ObjectStore

KSERVE_PYTHON = os.environ.get("KSERVE_PYTHON", "/tmp/kserve-venv/bin/python")
TRITON_VENV = Path(os.environ.get("TRITON_VENV", ROOT / ".tools" / "triton"))
"""A venv with nvidia-pytriton, numpy<2 and onnxruntime: ``make test`` makes ``.tools/triton``."""
QUICK = {"models": "small", "levels": "1,8", "requests": 200}
FULL = {"models": "small,large", "levels": "1,8,32", "requests": 2000}
"""``--models``, ``--levels`` and ``--requests`` of a ``--quick`` run and of a full one, unless given."""


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
                 extra_env: dict[str, str] | None = None, log_name: str = "edgeloop") -> None:
        super().__init__(model)
        self.name = "edgeloop" if max_batch > 1 else "edgeloop, batching off"
        self.metrics_port = free_port()
        env = {**os.environ, **s3.env(), "EDGELOOP_VERIFY_KEY_FILE": str(work / "keys" / "verify-key.pem"),
               "EDGE_MAX_BATCH_SIZE": str(max_batch), "EDGE_DEVICE_ID": "bench", "EDGE_VARIANT": "fp32",
               # one ONNX Runtime thread, like the other servers here: ORT pins its own workers to cores, which
               # would escape the server's one-core taskset
               "EDGE_ORT_INTRA_OP_THREADS": "1",
               "EDGE_TELEMETRY_INTERVAL_S": "3600", **(extra_env or {})}
        cache = work / f"cache-{model}-{max_batch}"
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
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def in_process_ort(path: Path, shape: tuple[int, ...]) -> tuple[float, float]:
    """Samples/s of ONNX Runtime in this process on the server core: batch 1, and the best of batch 16."""
    import onnxruntime as ort

    with on_core(SERVER_CORE):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rates = []
        for batch in (1, 16):
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            for _ in range(20):
                session.run(None, {"input": x})
            runs, started = 0, time.perf_counter()
            while time.perf_counter() - started < 2.0:
                session.run(None, {"input": x})
                runs += 1
            rates.append(runs * batch / (time.perf_counter() - started))
        return rates[0], rates[1]


def check_answers(server: Server, shape: tuple[int, ...], onnx: Path) -> None:
    """tritonclient gets the same logits as ONNX Runtime on the file (every server must be right, not only fast)."""
    import onnxruntime as ort
    import tritonclient.grpc as triton

    x = np.random.default_rng(7).standard_normal((1, *shape)).astype(np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = triton.InferenceServerClient(server.address).infer(server.model, [tensor]).as_numpy("logits")
    (expected,) = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def measure(server: Server, payload: bytes, levels: list[int], count: int) -> list[dict]:
    """At each concurrency of ``levels``: a warm-up at that level, then ``count`` measured calls; one row each."""
    rows = []
    for concurrency in levels:
        # warm up at this level (as perf_analyzer does), so what is measured is the steady state at this load, for
        # every server alike: caches warm, batchers settled
        asyncio.run(drive(server.address, payload, concurrency, max(100, count // 10)))
        server.mark()
        cpu_before = cpu_seconds(server.pid)
        latencies, seconds, errors = asyncio.run(drive(server.address, payload, concurrency, count, warmup=0))
        cpu = cpu_seconds(server.pid) - cpu_before
        done = len(latencies)
        rows.append({"server": server.name, "concurrency": concurrency, "rps": done / seconds,
                     "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
                     "cpu_us": cpu / max(done, 1) * 1e6, "batch": server.mean_batch(), "errors": errors})
        print(f"  {server.name:26s} c={concurrency:<3d} {rows[-1]['rps']:8.0f} req/s  p50 {rows[-1]['p50']:.2f} ms  "
              f"cpu/req {rows[-1]['cpu_us']:.0f} µs  batch {rows[-1]['batch'] or '-'}  errors {errors}", flush=True)
    return rows


AREAS = (("grpc/_cython", "grpc core (C)"), ("grpc/aio", "grpc.aio"), ("google/protobuf", "protobuf"),
         ("asyncio", "asyncio"), ("onnxruntime", "ONNX Runtime"), ("edge_runtime/serve", "edgeloop serve"),
         ("edge_runtime", "edgeloop other"), ("prometheus_client", "metrics"), ("numpy", "numpy"),
         ("concurrent/futures", "engine thread hand-off"), ("threading", "engine thread hand-off"))


def profile(server: Server, payload: bytes, concurrency: int, work: Path) -> list[tuple[str, float]]:
    """Sample the server with py-spy under load; the share of samples per area (by the innermost known frame)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = work / "profile.txt"
    recorder = subprocess.Popen([spy, "record", "-p", str(server.pid), "-d", "6", "-r", "250", "-f", "raw",
                                 "-o", str(out), "--nonblocking", "--subprocesses"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        asyncio.run(drive(server.address, payload, concurrency, 1000))
    recorder.wait(30)
    counts: dict[str, float] = {}
    total = 0.0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        area = next((name for frame in reversed(frames) for key, name in AREAS if key in frame), "other")
        counts[area] = counts.get(area, 0.0) + float(n)
        total += float(n)
    return sorted(((a, c / total) for a, c in counts.items()), key=lambda kv: -kv[1]) if total else []


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

    import onnxruntime as ort

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
    (y,) = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})
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


def tables(rows: list[dict], ceilings: dict[str, tuple[float, float]], levels: list[int],
           shm_result: dict[str, float], skipped: list[str], profiles: dict[str, list[tuple[str, float]]]) -> str:
    """The markdown table and the notes under it."""
    kserve = {(r["model"], r["concurrency"]): r["rps"] for r in rows if r["server"] == KServeTuned.name}
    lines = ["| model | server | c | req/s | p50 ms | p99 ms | server CPU µs/req | mean batch | ÷ KServe | "
             "÷ in-process ORT |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        k = kserve.get((r["model"], r["concurrency"]))
        best = ceilings[r["model"]][1]
        batch = "" if r["batch"] is None else f"{r['batch']:.1f}"
        versus = f"{r['rps'] / k:.2f}x" if k else ""
        lines.append(f"| {r['model']} | {r['server']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50']:.2f} | "
                     f"{r['p99']:.2f} | {r['cpu_us']:.0f} | {batch} | {versus} | {r['rps'] / best:.2f} |")
    lines.append("")
    for model, (b1, b16) in ceilings.items():
        lines.append(f"- in-process ONNX Runtime, one core, {model}: {b1:.0f} samples/s at batch 1, {b16:.0f} at "
                     f"batch 16")
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
    for model, shares in profiles.items():
        top = ", ".join(f"{area} {share:.0%}" for area, share in shares[:8])
        lines.append(f"- where edgeloop's server CPU goes ({model}, py-spy, c={c}): {top}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", help=f"concurrencies (default {FULL['levels']}; --quick: {QUICK['levels']})")
    parser.add_argument("--requests", type=int,
                        help=f"measured calls per level (default {FULL['requests']}; --quick: {QUICK['requests']})")
    parser.add_argument("--servers",
                        default="edgeloop,edgeloop-nobatch,edgeloop-triton,edgeloop-triton-python,kserve,triton")
    parser.add_argument("--models", help=f"default {FULL['models']}; --quick: {QUICK['models']}")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="largest batch of every batching server (edgeloop, edgeloop + Triton, Triton)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the edgeloop server at the highest concurrency and print where its CPU goes")
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
    profiles: dict[str, list[tuple[str, float]]] = {}
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
                        check_answers(server, shape, onnx)
                        for row in measure(server, payload, levels, requests):
                            rows.append({**row, "model": model})
                        if args.profile and server.name == "edgeloop":
                            profiles[model] = profile(server, payload, max(levels), work)
                    except Exception as exc:  # noqa: BLE001 - a server that fails here is reported, not fatal
                        skipped.append(f"{server.name} ({model}): {type(exc).__name__}: {exc}")
                    finally:
                        server.stop()
            if "edgeloop" in wanted:
                shm_result = shared_memory_run(s3, store, work, requests)

    table = tables(rows, ceilings, levels, shm_result, skipped, profiles)
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
    main()
