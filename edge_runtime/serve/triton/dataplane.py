"""NVIDIA Triton as the data plane (``EDGE_SERVING_ENGINE=triton``): edgeloop fetches, builds, validates and swaps;
a supervised ``tritonserver`` serves the device's inference port.

* :func:`find_triton` locates the binary: a Triton install (``EDGE_TRITON_HOME``: the JetPack release or the x86
  image's ``/opt/tritonserver``) or the ``tritonserver`` inside the ``nvidia-pytriton`` wheel of a virtualenv
  (``EDGE_TRITON_PYTHON``: its interpreter; the wheel needs numpy < 2, so it lives apart from edgeloop's own), and
  the backend that serves ONNX Runtime engines (``EDGE_TRITON_BACKEND``, :func:`ort_backend_for`): Triton's native
  ``onnxruntime`` backend where the install has it, else Triton's Python backend; edgeloop's own C backend
  (:mod:`edge_runtime.serve.triton.native`, in-process) only when asked for by name.
* :class:`TritonServer` starts it in explicit model-control mode (gRPC on the inference port, metrics on their own
  port, HTTP off, the repository API restricted to calls carrying a per-start secret header that only edgeloop
  holds), talks to it over the Open Inference Protocol (ServerLive, the repository extension, ModelInfer), and
  restarts it when it dies.
* :func:`write_model` writes one model version: a TensorRT plan (``platform: tensorrt_plan``), or the ONNX Runtime
  engine edgeloop built, for Triton's ``onnxruntime`` backend (``model.onnx``), for the Python-backend model in
  ``backend/model.py`` or for edgeloop's backend, with a generated ``config.pbtxt`` (:func:`model_config`: inputs,
  outputs, ``max_batch_size``, dynamic batching from the tuned limits, one instance, ONNX Runtime's thread counts,
  ``version_policy: latest 1`` so that loading a new version swaps it in only once it loaded).
* The Python-backend model hands what it answers to field capture and field statistics through the folder
  :attr:`TritonServer.tap_dir` (``EDGELOOP_TRITON_TAP``; :mod:`edge_runtime.report.capture.triton_tap`).
* :class:`TritonEngine` is an :class:`~edge_runtime.build.engines.base.Engine` whose runs go through Triton: validation
  runs through it on the engine Triton serves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from edge_runtime.build.engines.base import DATATYPE_TO_NUMPY, TensorInfo
from edge_runtime.serve.triton.backend.edgeloop_tap import INTERNAL_REQUEST_ID
from edge_runtime.serve.triton.native import ENGINE_MODULE, backend_library, install_backend
from edge_runtime.serve.triton.native import NAME as BACKEND_NAME
from edgeloop_core.errors import ConfigError, EngineError, InvalidInput
from edgeloop_core.files import write_atomic
from edgeloop_core.protos import inference_pb2 as pb
from edgeloop_core.protos import inference_pb2_grpc

log = logging.getLogger(__name__)

BACKEND_MODEL = Path(__file__).with_name("backend") / "model.py"
TAP_MODULE = BACKEND_MODEL.with_name("edgeloop_tap.py")
"""The Python-backend model's half of field capture and field statistics (copied beside ``model.py``)."""
TAP_ENV = "EDGELOOP_TRITON_TAP"
"""Names, for tritonserver and its stubs, the folder of :attr:`TritonServer.tap_dir`."""
CANDIDATE_SUFFIX = "__candidate"
"""Name under which a version is validated through Triton before it takes the model's name (``_`` is outside the
model-name pattern, so no real model can collide with it)."""
_TRITON_ERROR = re.compile(r"E\d{4} ")
"""How Triton's error lines begin (glog: severity, month, day)."""
_TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16",
                 "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
                 "UINT64": "TYPE_UINT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64"}


@dataclass(frozen=True)
class TritonInstall:
    """Where ``tritonserver`` is, its backends, and the environment it needs."""

    binary: Path
    backends: Path
    env: dict[str, str] = field(default_factory=dict)
    ort_backend: str = "python"
    """The Triton backend that serves ONNX Runtime engines: Triton's native ``onnxruntime``, Triton's ``python``
    backend, or edgeloop's own (``edgeloop``, opt-in)."""


ORT_BACKENDS = ("auto", "onnxruntime", "python", "edgeloop")
"""What ``EDGE_TRITON_BACKEND`` may name for ONNX Runtime engines (:func:`ort_backend_for`)."""


def installed_backends(backends: Path) -> frozenset[str]:
    """The Triton backends under the backend directory ``backends``: each folder ``<name>`` holding Triton's
    ``libtriton_<name>.so`` (``onnxruntime/libtriton_onnxruntime.so``, ``python/libtriton_python.so``, ...)."""
    try:
        folders = [entry for entry in Path(backends).iterdir() if entry.is_dir()]
    except OSError:
        return frozenset()
    return frozenset(f.name for f in folders if (f / f"libtriton_{f.name}.so").exists())


def ort_backend_for(requested: str, installed: frozenset[str] | set[str]) -> str:
    """The Triton backend that serves ONNX Runtime engines, given what was asked (``EDGE_TRITON_BACKEND``) and the
    backends the Triton install has (:func:`installed_backends`): ``auto`` takes Triton's native ``onnxruntime``
    backend where it is installed (the Jetson and x86 Triton releases), else Triton's ``python`` backend (the
    nvidia-pytriton wheel); ``onnxruntime`` and ``python`` name one and need it installed; ``edgeloop`` (edgeloop's
    own C backend) is only ever an explicit choice. ConfigError, in one line, where the choice cannot be had."""
    if requested not in ORT_BACKENDS:
        raise ConfigError(f"EDGE_TRITON_BACKEND={requested} is not one of {', '.join(ORT_BACKENDS)}")
    if requested == "edgeloop":
        return requested
    wanted = ("onnxruntime", "python") if requested == "auto" else (requested,)
    for name in wanted:
        if name in installed:
            return name
    raise ConfigError(f"Triton has no {' or '.join(wanted)} backend to run ONNX Runtime engines with (its backend "
                      f"directory holds {', '.join(sorted(installed)) or 'none'}): install Triton's "
                      f"{wanted[0]} backend or set EDGE_TRITON_BACKEND")


def find_triton(home: Path | None, python: Path | None, work: Path, backend: str = "auto") -> TritonInstall:
    """The Triton to run: ``home`` (a Triton install: ``bin/tritonserver``, ``backends/``), else the wheel in
    ``python``'s virtualenv, and the backend that serves ONNX Runtime engines (:func:`ort_backend_for`: Triton's
    native ``onnxruntime`` where installed, else its ``python`` backend; edgeloop's own C backend only when
    ``backend`` is ``edgeloop``). ConfigError, saying what to set or install, if what was asked for is not usable."""
    install = _locate(home, python, work)
    choice = ort_backend_for(backend, installed_backends(install.backends))
    embedded = Path(python) if python is not None else Path(sys.executable)  # its site-packages: numpy, onnxruntime
    if choice == "python":
        if home is None:  # the wheel's stub was copied for that interpreter and finds its packages
            return install
        return replace(install, env={**install.env, "PATH": _python_first_on_path(embedded)})
    if choice == "onnxruntime":
        return replace(install, ort_backend=choice)
    return _with_edgeloop_backend(install, home, embedded, work)


def _python_first_on_path(python: Path) -> str:
    """PATH with ``python``'s folder first. The Python backend's stub embeds the system's libpython in an isolated
    configuration (PYTHONPATH is ignored) and takes its prefix from the ``python3`` it finds on PATH: the venv's,
    so it imports numpy and onnxruntime from there."""
    return os.pathsep.join(p for p in (str(Path(python).parent), os.environ.get("PATH", "")) if p)


def _with_edgeloop_backend(install: TritonInstall, home: Path | None, embedded: Path, work: Path) -> TritonInstall:
    """``install`` with edgeloop's own backend (built or prebuilt for ``embedded``) beside Triton's backends (an
    install's backend folder stays as it is: its backends are linked beside ours)."""
    library = backend_library(embedded, work)
    backends = install.backends
    if home is not None:
        backends = Path(work) / "triton-backends"
        backends.mkdir(parents=True, exist_ok=True)
        for entry in Path(install.backends).iterdir():
            link = backends / entry.name
            if link.is_symlink() or not link.exists():
                link.unlink(missing_ok=True)
                link.symlink_to(entry.resolve())
    install_backend(library, backends)
    return replace(install, backends=backends, ort_backend=BACKEND_NAME,
                   env={**install.env, "EDGELOOP_TRITON_PYTHON": str(embedded)})


def _locate(home: Path | None, python: Path | None, work: Path) -> TritonInstall:
    """:func:`find_triton`'s binary. For the wheel, the Python backend's stub for that interpreter is copied beside
    the wheel's backends (into ``work``), and the wheel's libraries and the interpreter's own ``libpython`` go first
    on ``LD_LIBRARY_PATH`` (otherwise the stub loads another libpython)."""
    if home is not None:
        binary = Path(home) / "bin" / "tritonserver"
        if not binary.exists():
            raise ConfigError(f"no tritonserver under EDGE_TRITON_HOME={home} (expected bin/tritonserver)")
        lib = str(Path(home) / "lib")
        return TritonInstall(binary, Path(home) / "backends",
                             {"LD_LIBRARY_PATH": ":".join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH")) if p)})
    if python is None:
        raise ConfigError("serving engine triton needs EDGE_TRITON_HOME (a Triton install) or EDGE_TRITON_PYTHON (the "
                          "python of a virtualenv with nvidia-pytriton, numpy<2 and onnxruntime)")
    probe = ("import json, sys, sysconfig, pathlib, pytriton; "
             "print(json.dumps({'site': str(pathlib.Path(pytriton.__file__).parent.parent), "
             "'libdir': sysconfig.get_config_var('LIBDIR'), 'py': f'{sys.version_info[0]}.{sys.version_info[1]}'}))")
    try:
        found = json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60,
                                          check=True).stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise ConfigError(f"EDGE_TRITON_PYTHON={python} has no nvidia-pytriton (pip install nvidia-pytriton "
                          f"'numpy<2' onnxruntime in that virtualenv)") from exc
    site = Path(found["site"])
    home_dir = site / "pytriton" / "tritonserver"
    stub = home_dir / "python_backend_stubs" / found["py"] / "triton_python_backend_stub"
    if not (home_dir / "bin" / "tritonserver").exists() or not stub.exists():
        raise ConfigError(f"the nvidia-pytriton wheel under {site} has no tritonserver or no Python-backend stub for "
                          f"Python {found['py']}")
    backends = Path(work) / "triton-backends"
    if not (backends / "python" / "triton_python_backend_stub").exists():
        staging = backends.with_name(backends.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(home_dir / "backends", staging)
        shutil.copy(stub, staging / "python" / "triton_python_backend_stub")
        shutil.rmtree(backends, ignore_errors=True)
        staging.rename(backends)
    libs = [str(site / "nvidia_pytriton.libs"), found["libdir"], os.environ.get("LD_LIBRARY_PATH", "")]
    env = {"LD_LIBRARY_PATH": ":".join(p for p in libs if p),
           "PATH": f"{Path(python).parent}:{os.environ.get('PATH', '')}"}
    return TritonInstall(home_dir / "bin" / "tritonserver", backends, env)


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the runtime dies, however it dies (no orphan Triton
    holding the inference port)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TritonServer:
    """One supervised ``tritonserver`` (explicit model control) over the model repository ``repo``."""

    def __init__(self, install: TritonInstall, repo: Path, *, bind_address: str, grpc_port: int, metrics_port: int,
                 log_path: Path, start_timeout_s: float = 120.0) -> None:
        self.install = install
        self.repo = Path(repo)
        self.bind_address = bind_address
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self._log_from = 0
        """Where this start's lines begin in the log (it is appended to across restarts)."""
        self._stubs: dict[int, tuple[str, str]] = {}
        """pid → (model, version) of the Python-backend stubs :meth:`python_stubs` found last."""
        self.restarts = 0
        self._control_key, self._control_value = "edgeloop-control", secrets.token_hex(16)
        self._control = ((f"triton-grpc-protocol-{self._control_key}", self._control_value),)  # Triton prefixes it
        """Triton's repository API (load, unload) answers only calls carrying this header: apps on the inference
        port must not unload what edgeloop validated (repository control stays edgeloop's, with its own auth)."""
        self._channel: grpc.Channel | None = None
        self._stub: inference_pb2_grpc.GRPCInferenceServiceStub | None = None
        self.tap_dir: Path | None = None
        """Where the Python-backend models hand what they answered to edgeloop (``tap.sock``, ``tap.json``:
        :mod:`edge_runtime.report.capture.triton_tap`): a private (0700) folder made at the first start, kept across
        restarts, short enough for a Unix socket's path."""

    # --- the process -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start tritonserver and wait until it is live; EngineError with the end of its log if it is not."""
        self.repo.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.tap_dir is None:
            self.tap_dir = Path(tempfile.mkdtemp(prefix="edgeloop-tap-"))
        argv = [str(self.install.binary), f"--model-repository={self.repo}", "--model-control-mode=explicit",
                f"--backend-directory={self.install.backends}", f"--grpc-address={self.bind_address}",
                f"--grpc-port={self.grpc_port}", "--allow-http=false", "--allow-metrics=true",
                f"--metrics-port={self.metrics_port}", "--exit-on-error=false", "--log-verbose=0",
                f"--grpc-restricted-protocol=model-repository:{self._control_key}={self._control_value}"]
        with open(self.log_path, "ab") as out:
            self._log_from = out.seek(0, os.SEEK_END)
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **self.install.env, TAP_ENV: str(self.tap_dir)},
                                            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.start_timeout_s
        while not self.live():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"tritonserver did not start: {self.log_tail()}")
            time.sleep(0.2)
        log.info("tritonserver live on %s:%d (metrics :%d)", self.bind_address, self.grpc_port, self.metrics_port)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace_s: float = 10.0) -> None:
        if self.tap_dir is not None:  # nobody taps it (an empty folder): none is left behind in /tmp
            with contextlib.suppress(OSError):
                self.tap_dir.rmdir()
                self.tap_dir = None
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def python_stubs(self, rescan: bool = False) -> set[tuple[str, str]] | None:
        """(model, version) of every live Python-backend stub of this ``tritonserver``, from /proc (``None`` where
        that cannot be read). A stub that died (killed for memory, crashed in ONNX Runtime) is a zombie child until
        Triton reaps it, which it does not do on its own, and does not count. The stubs found last are checked by
        pid (one small read each); every process is looked at only when one of them is gone, or with ``rescan``
        (to find the stubs of versions loaded since)."""
        if self.process is None:
            return set()
        if not rescan and self._stubs and all(_child_state(pid, self.process.pid) not in (None, "Z")
                                              for pid in self._stubs):
            return set(self._stubs.values())
        try:
            pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            return None
        self._stubs = {}
        for pid in pids:
            if _child_state(pid, self.process.pid) in (None, "Z"):
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    argv = cmdline.read().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            if len(argv) < 2 or not argv[0].endswith(b"triton_python_backend_stub"):
                continue
            model_py = Path(argv[1].decode(errors="replace"))  # <repo>/<model>/<version>/model.py
            if model_py.parent.parent.parent == self.repo:
                self._stubs[pid] = (model_py.parent.parent.name, model_py.parent.name)
        return set(self._stubs.values())

    def log_tail(self, lines: int = 5) -> str:
        """What this start of tritonserver said last: its error lines (Triton's ``E<date>`` lines, without the
        time/thread/source prefix) where it logged any, else its last lines; one line."""
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(self._log_from)
                said = [line for line in log_file.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        errors = [line.split("] ", 1)[-1].strip().strip('"').strip() for line in said if _TRITON_ERROR.match(line)]
        return " | ".join((errors or said)[-lines:]) or "nothing logged"

    @property
    def control_headers(self) -> dict[str, str]:
        """The header Triton's repository API (load, unload, index) requires from this start on."""
        return dict(self._control)

    # --- the Open Inference Protocol to it ---------------------------------------------------------------------
    @property
    def stub(self) -> inference_pb2_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            host = "127.0.0.1" if self.bind_address in ("0.0.0.0", "::", "[::]") else self.bind_address
            self._channel = grpc.insecure_channel(f"{host}:{self.grpc_port}", options=[
                ("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)])
            self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def live(self) -> bool:
        try:
            return self.stub.ServerLive(pb.ServerLiveRequest(), timeout=2).live
        except grpc.RpcError:
            return False

    def load(self, name: str, timeout_s: float = 300.0) -> None:
        """Load (or reload: the new version swaps in once loaded) model ``name``; EngineError with Triton's words."""
        try:
            self.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=timeout_s,
                                          metadata=self._control)
        except grpc.RpcError as exc:
            raise EngineError(f"Triton could not load {name}: {_one_line(exc.details())}") from exc

    def unload(self, name: str) -> None:
        try:
            self.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=60,
                                            metadata=self._control)
        except grpc.RpcError as exc:
            raise EngineError(f"Triton could not unload {name}: {_one_line(exc.details())}") from exc

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=5).ready
        except grpc.RpcError:
            return False

    def metrics(self) -> dict[str, dict[str, float]]:
        """Triton's per-model counters from its Prometheus endpoint: model → {requests, failures, executions,
        inferences, queue_us, compute_us} (empty where this build exports none)."""
        import urllib.request

        names = {"nv_inference_request_success": "requests", "nv_inference_request_failure": "failures",
                 "nv_inference_exec_count": "executions", "nv_inference_count": "inferences",
                 "nv_inference_queue_duration_us": "queue_us", "nv_inference_compute_infer_duration_us": "compute_us"}
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3).read().decode()
        except OSError:
            return {}
        figures: dict[str, dict[str, float]] = {}
        for line in text.splitlines():
            metric = line.split("{", 1)[0]
            if metric not in names or 'model="' not in line:
                continue
            model = line.split('model="', 1)[1].split('"', 1)[0]
            per_model = figures.setdefault(model, {})
            per_model[names[metric]] = per_model.get(names[metric], 0.0) + float(line.rsplit(" ", 1)[1])
        return figures


def _one_line(said: str | None) -> str:
    """Triton's words on one line (its load errors end in ";\\n", and may join several lines)."""
    return " ".join((said or "no reason given").split()).rstrip(";")


def _child_state(pid: int, parent: int) -> str | None:
    """The state letter (``R``, ``S``, ``Z``, ...) of process ``pid`` if it is a child of ``parent``, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode() if len(fields) > 1 and int(fields[1]) == parent else None


def next_version_number(model_dir: Path) -> int:
    """One above the highest version folder under ``model_dir`` (Triton versions are positive integers)."""
    numbers = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(numbers, default=0) + 1


def batches(inputs: tuple[TensorInfo, ...], max_batch_size: int) -> bool:
    """Whether Triton batches the model: every input has a dynamic batch axis, and batches may exceed one."""
    return bool(inputs) and all(i.shape and i.shape[0] == -1 for i in inputs) and max_batch_size > 1


def _dims(info: TensorInfo, batched: bool) -> str:
    shape = info.shape[1:] if batched else info.shape
    return ", ".join(str(d) for d in shape)


def write_model(repo: Path, name: str, number: int, *, engine_path: Path, platform: str,
                inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...], max_batch_size: int,
                max_queue_delay_us: int, edgeloop_version: str, variant: str, threads: int = 1,
                spin: bool = False, backend: str = "python") -> Path:
    """Write version ``number`` of Triton model ``name``; returns its folder.

    A TensorRT plan is linked in as ``model.plan``; any other engine is an ONNX Runtime engine at ``engine_path`` (the
    ONNX that passed validation on the device), served by ``backend``: Triton's native ``onnxruntime`` (linked in as
    ``model.onnx``, its thread counts in the config's parameters), Triton's ``python`` backend (with the model in
    ``backend/model.py``) or edgeloop's own; the last two read ``engine.json`` (the engine and ONNX Runtime's
    threads and spinning). A model whose inputs have no dynamic batch axis gets ``max_batch_size: 0`` (no
    batching), as Triton requires. Nothing is ever half-written where Triton looks (a full disk, a crash): the
    version folder is filled under a name Triton ignores and renamed whole, then config.pbtxt is replaced
    atomically; a failure leaves the repository as it was."""
    tensorrt = platform == "tensorrt_plan"
    backend = "tensorrt_plan" if tensorrt else backend
    config = model_config(name, backend, inputs, outputs, max_batch_size, max_queue_delay_us,
                          {"edgeloop_version": edgeloop_version, "variant": variant}, threads=threads)
    model_dir = Path(repo) / name
    folder = model_dir / str(number)
    staging = model_dir / f".{number}.staging"  # not an integer: Triton skips it
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        if backend in ("tensorrt_plan", "onnxruntime"):  # Triton's own backends read the file itself
            filename = "model.plan" if tensorrt else "model.onnx"
            (staging / filename).symlink_to(Path(engine_path).resolve())
        else:
            if backend == "python":
                shutil.copy(BACKEND_MODEL, staging / "model.py")
                shutil.copy(ENGINE_MODULE, staging / ENGINE_MODULE.name)
                shutil.copy(TAP_MODULE, staging / TAP_MODULE.name)
            write_atomic(staging / "engine.json", json.dumps({"engine": str(Path(engine_path).resolve()),
                                                              "threads": threads, "spin": spin}).encode())
        staging.rename(folder)
        write_atomic(model_dir / "config.pbtxt", config.encode())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def model_config(name: str, backend: str, inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...],
                 max_batch_size: int, max_queue_delay_us: int, parameters: dict[str, str], *,
                 threads: int = 0) -> str:
    """The config.pbtxt of :func:`write_model` (text format of Triton's ``inference.ModelConfig``; ``backend``:
    ``tensorrt_plan``, or the backend of an ONNX Runtime engine; ``threads``: ONNX Runtime's intra-op threads, 0
    for its default, set for Triton's ``onnxruntime`` backend with one inter-op thread, as the builtin engine runs
    it); ConfigError for a tensor type Triton does not have."""
    batched = batches(inputs, max_batch_size)
    tensorrt = backend == "tensorrt_plan"
    lines = [f'name: "{name}"', 'platform: "tensorrt_plan"' if tensorrt else f'backend: "{backend}"',
             f"max_batch_size: {max_batch_size if batched else 0}"]
    for kind, tensors in (("input", inputs), ("output", outputs)):
        entries = []
        for t in tensors:
            if t.datatype not in _TRITON_TYPES:
                raise ConfigError(f"{name}: Triton has no type for {t.name} ({t.datatype})")
            kind_of = _TRITON_TYPES[t.datatype]
            dims = _dims(t, batched)
            # Triton needs a dimension besides the batch: a [batch] tensor is [batch, 1] to clients (its rule)
            shape = f"dims: [ {dims} ]" if dims else "dims: [ 1 ] reshape: { shape: [ ] }"
            entries.append(f'  {{ name: "{t.name}" data_type: {kind_of} {shape} }}')
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}")
    lines.append(f'instance_group [ {{ count: 1 kind: {"KIND_GPU" if tensorrt else "KIND_CPU"} }} ]')
    lines.append("version_policy: { latest: { num_versions: 1 } }")
    if backend == "onnxruntime":  # Triton's ONNX Runtime backend reads its session options from here
        parameters = {**parameters, "intra_op_thread_count": str(max(0, threads)), "inter_op_thread_count": "1"}
    for key, value in parameters.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}')
    return "\n".join(lines) + "\n"


def served_backend(repo: Path, name: str) -> str | None:
    """The Triton backend model ``name`` is written for in ``repo`` (``python``, ``onnxruntime``, ``edgeloop``, or
    ``tensorrt_plan`` for a plan), from its config.pbtxt; ``None`` when it has none."""
    try:
        config = (Path(repo) / name / "config.pbtxt").read_text()
    except OSError:
        return None
    found = re.search(r'^(?:backend|platform): "([^"]+)"', config, re.MULTILINE)
    return found.group(1) if found else None


def prune_versions(repo: Path, name: str, keep: int) -> None:
    """Remove every version folder of ``name`` but ``keep`` (after Triton swapped to it), and any staging folder a
    crash left behind."""
    for folder in (Path(repo) / name).glob("*"):
        stale = folder.name.isdigit() and int(folder.name) != keep or folder.name.endswith(".staging")
        if folder.is_dir() and stale:
            shutil.rmtree(folder, ignore_errors=True)


def remove_model(repo: Path, name: str) -> None:
    shutil.rmtree(Path(repo) / name, ignore_errors=True)


class TritonEngine:
    """An :class:`~edge_runtime.build.engines.base.Engine` whose runs go through Triton's gRPC endpoint (so validation
    measures the engine Triton serves, behind Triton's own front end and batcher)."""

    def __init__(self, server: TritonServer, name: str, inputs: tuple[TensorInfo, ...],
                 outputs: tuple[TensorInfo, ...], max_batch_size: int, platform: str, memory_bytes: int = 0) -> None:
        self.server, self.name = server, name
        self.inputs, self.outputs = inputs, outputs
        self.max_batch_size = max_batch_size
        self.platform = platform
        self.memory_bytes = memory_bytes
        self.version = ""
        """Triton's version number of what serves (set after a load)."""
        self._batched = batches(inputs, max_batch_size)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch through Triton; tensors keep the model's shapes (a [batch] tensor, [batch, 1] on Triton's side,
        is reshaped both ways)."""
        request = pb.ModelInferRequest(model_name=self.name, id=INTERNAL_REQUEST_ID)  # not field data: never tapped
        for info in self.inputs:
            array = np.ascontiguousarray(inputs[info.name], dtype=DATATYPE_TO_NUMPY[info.datatype])
            if self._batched and array.ndim == 1:
                array = array.reshape(-1, 1)
            request.inputs.add(name=info.name, datatype=info.datatype, shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
        for info in self.outputs:
            request.outputs.add(name=info.name)
        try:
            response = self.server.stub.ModelInfer(request, timeout=60)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidInput(f"Triton refused the batch: {exc.details()}") from exc
            raise EngineError(f"Triton failed to run a batch on {self.name}: {exc.details()}") from exc
        results = {}
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=False):
            dtype = DATATYPE_TO_NUMPY[out.datatype]
            results[out.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(out.shape))
        if self._batched:
            for info in self.outputs:
                if len(info.shape) == 1 and info.name in results:
                    results[info.name] = results[info.name].reshape(-1)
        return results

    def close(self) -> None:
        """Nothing to free here: Triton holds the engine (the life cycle unloads it from Triton when it must)."""

