"""``edgeloop edge selfcheck``: the one command a person with a Jetson (or any NVIDIA GPU) runs once.

It prints the device's facts and target key, probes CUDA through the driver (``libcuda``, no Python package needed),
checks TensorRT against the JetPack support matrix, writes the demo model (:mod:`edge_runtime.report.demo_model`) in
fp32, fp16 and int8-qdq, builds each with TensorRT through the runtime's own build path, validates each against FP32
and times them at batch 1 and at batch 32 (with the module's energy per inference where the device has power rails),
says which precision wins (strongly typed INT8 can lose to FP16 when the unquantized layers stay FP32), runs the GPU
conformance tests (``pytest -m gpu``) where the tests are installed, checks with ``ldd`` that Triton, TensorRT's and
ONNX Runtime's libraries resolve (``dockerfiles/check_libraries.py``, the images' build-time check), and writes ONE
JSON report (:class:`SelfcheckReport`, ``schema_version`` 1).

It runs unchanged where parts are missing (no TensorRT, no GPU, no Triton, no tests): each check says ``ok``,
``failed`` or ``skipped`` with the reason, and the command exits 1 only when a check failed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.build.device import CUDA_ERROR_HINTS, DeviceFacts, detect
from edge_runtime.build.power import PowerSampler
from edge_runtime.report.events import describe

if TYPE_CHECKING:
    from edge_runtime.build.choice import VariantFigures
    from edge_runtime.report.demo_model import DemoModel
    from edge_runtime.settings import EdgeSettings

SCHEMA_VERSION = 1
Status = Literal["ok", "failed", "skipped"]
TIMING_BATCH = 32
CHECK_LIBRARIES = ("dockerfiles/check_libraries.py", "/opt/edgeloop/check_libraries.py")
"""Where the images' ldd check lives: in a source checkout (relative to it), and in the images."""
CU_DEVICE_ATTRIBUTE = {"sm_count": 16, "cc_major": 75, "cc_minor": 76}
"""``CUdevice_attribute`` values of the CUDA driver API (``cuda.h``)."""


class CheckResult(BaseModel):
    """One check: what it found, or why it could not look."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: Status
    reason: str = Field(description="the finding in one line when ok; why, when failed or skipped")
    seconds: float = Field(description="how long the check took, seconds")
    details: dict[str, Any] = Field(default_factory=dict)


class PrecisionFigure(BaseModel):
    """One variant of the demo model on one backend, as built and measured here."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    backend: str
    target_key: str
    build_seconds: float
    agreement: float = Field(description="top-1 agreement with the FP32 model on the demo's validation set, 0..1")
    passed: bool
    b1_p50_ms: float | None = None
    batched_p50_ms: float | None = Field(None, description=f"p50 of one batch of {TIMING_BATCH}, ms")
    batch: int = TIMING_BATCH
    mj_per_inference: float | None = Field(None, description="module energy per inference, mJ (None: no rails)")


class SelfcheckReport(BaseModel):
    """The JSON the command writes; ``schema_version`` changes whenever a key changes meaning or goes away."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    created_at: datetime
    hostname: str
    edgeloop_version: str
    device: dict[str, Any] = Field(description="DeviceFacts: arch, ONNX Runtime, TensorRT, GPU, L4T, module")
    backend: str | None = Field(description="what backend auto resolves to here; None when the runtime would refuse")
    target_key: str | None = Field(description="the demo model's fp32 target key on that backend")
    checks: list[CheckResult]
    precision: list[PrecisionFigure] = Field(default_factory=list)
    winner: str | None = Field(None, description="the TensorRT precision that wins here (balanced latency score)")
    ok: bool = Field(description="no check failed")


@dataclass
class _Run:
    """What the checks share: settings, facts, the demo model, the built engines' figures."""

    settings: EdgeSettings
    work: Path
    tests: Path | None
    run_tests: bool
    budget_s: float
    facts: DeviceFacts | None = None
    backend: str | None = None
    device: str = "cpu"
    gpu: bool = False
    demo: DemoModel | None = None
    figures: dict[str, list[VariantFigures]] = field(default_factory=dict)
    precision: list[PrecisionFigure] = field(default_factory=list)
    target_key: str | None = None
    winner: str | None = None


Outcome = tuple[Status, str, dict[str, Any]]


def _timed(name: str, check: Callable[[], Outcome]) -> CheckResult:
    """Run one check; anything it raises is a failed check with one readable line (never a traceback)."""
    started = time.monotonic()
    try:
        status, reason, details = check()
    except Exception as exc:  # noqa: BLE001 - a broken part is a finding, not the end of the check
        status, reason, details = "failed", describe(exc), {}
    return CheckResult(name=name, status=status, reason=reason, seconds=round(time.monotonic() - started, 3),
                       details=details)


def check_device(run: _Run) -> Outcome:
    """The device's facts and what ``backend`` resolves to (a Jetson whose TensorRT is unusable fails here)."""
    from edge_runtime.build.engines import resolve_backend

    s = run.settings
    run.facts = detect(s.tegra_release_file, s.device_model_file, s.device_module)
    details = {"facts": run.facts.to_dict()}
    run.backend, run.device = resolve_backend(run.facts, s.backend, allow_cpu_fallback=s.allow_cpu_fallback)
    where = f"Jetson {run.facts.module or '?'} (L4T r{run.facts.l4t_release or '?'})" if run.facts.is_jetson \
        else f"{run.facts.arch} ({run.facts.gpu_name or 'no TensorRT GPU'})"
    on = f" on {run.device}" if run.backend == "onnxruntime" else ""
    return "ok", f"{where}: backend {run.backend}{on}", {**details, "backend": run.backend}


def _libcuda() -> ctypes.CDLL | None:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _cu(lib: ctypes.CDLL, call: str, *args: object) -> None:
    """One driver call; a CUDA error is raised as one line with the likely fix."""
    code = getattr(lib, call)(*args)
    if code != 0:
        raise RuntimeError(f"{call}: CUDA error {code}: {CUDA_ERROR_HINTS.get(code, 'see the CUDA documentation')}")


def cuda_probe() -> Outcome:
    """GPU 0 through the CUDA driver API (ctypes on ``libcuda``, ``cuda.h`` signatures): name, compute capability,
    SMs, memory, driver version."""
    lib = _libcuda()
    if lib is None:
        return "skipped", "no NVIDIA driver here (libcuda.so.1 not found): no CUDA GPU to check", {}
    count, device, value, driver = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    try:
        _cu(lib, "cuInit", ctypes.c_uint(0))
        _cu(lib, "cuDeviceGetCount", ctypes.byref(count))
        if count.value == 0:
            return "failed", "the NVIDIA driver sees no GPU", {}
        _cu(lib, "cuDeviceGet", ctypes.byref(device), 0)
        name = ctypes.create_string_buffer(256)
        _cu(lib, "cuDeviceGetName", name, 256, device)
        found: dict[str, Any] = {"name": name.value.decode(errors="replace"), "devices": count.value}
        for key, attribute in CU_DEVICE_ATTRIBUTE.items():
            _cu(lib, "cuDeviceGetAttribute", ctypes.byref(value), attribute, device)
            found[key] = value.value
        memory = ctypes.c_size_t()
        _cu(lib, "cuDeviceTotalMem_v2", ctypes.byref(memory), device)
        _cu(lib, "cuDriverGetVersion", ctypes.byref(driver))
    except RuntimeError as exc:
        return "failed", str(exc), {}
    found.update(memory_bytes=memory.value, driver=f"{driver.value // 1000}.{driver.value % 1000 // 10}")
    return "ok", f"{found['name']}, sm_{found['cc_major']}{found['cc_minor']}, {found['sm_count']} SMs, " \
        f"CUDA driver {found['driver']}", found


def check_cuda(run: _Run) -> Outcome:
    """:func:`cuda_probe`; a GPU found here lets the GPU conformance tests run."""
    outcome = cuda_probe()
    run.gpu = outcome[0] == "ok"
    return outcome


def check_tensorrt(run: _Run) -> Outcome:
    """TensorRT present and usable here, and a combination the support matrix accepts."""
    from edge_runtime.build.engines import resolve_backend

    facts = run.facts
    if facts is None or facts.trt_version is None:
        return "skipped", "TensorRT is not installed (no tensorrt Python module): ONNX Runtime serves here", {}
    if facts.trt_error:
        return "failed", f"TensorRT {facts.trt_version} is installed but unusable: {facts.trt_error}", {}
    resolve_backend(facts, "tensorrt")  # the support matrix: a ConfigError with the reason
    return "ok", f"TensorRT {facts.trt_version} on {facts.gpu_name} (sm_{facts.compute_capability})", \
        {"version": facts.trt_version}


def check_power(run: _Run) -> Outcome:
    """The INA3221 rails energy per inference is read from."""
    sampler = PowerSampler.from_settings(run.settings)
    if not sampler.available:
        return "skipped", sampler.reason + ": energy per inference is absent", {}
    milliwatts = {rail.label: round(rail.read_mw(), 1) for rail in sampler.rails}
    return "ok", f"module power from {', '.join(milliwatts)}: {sum(milliwatts.values()):.0f} mW now", \
        {"rails_mw": milliwatts}


def check_demo_model(run: _Run) -> Outcome:
    """Write the demo model's three variants (needs the ``onnx`` package)."""
    if importlib.util.find_spec("onnx") is None:
        return "skipped", "the onnx package is not installed (pip install onnx): the demo model cannot be written", {}
    from edge_runtime.report.demo_model import write_demo_model

    run.demo = write_demo_model(run.work / "demo")
    sizes = {name: path.stat().st_size for name, path in run.demo.files.items()}
    return "ok", "wrote " + ", ".join(f"{name} ({size // 1024} KiB)" for name, size in sizes.items()), \
        {"bytes": sizes, "folder": str(run.demo.folder)}


def _build_and_measure(run: _Run, backend: str, device: str, variant: str) -> PrecisionFigure:
    """One variant on ``backend``: built by the runtime's build path, validated against FP32, timed (and its energy
    measured) at batch 1 and at :data:`TIMING_BATCH`."""
    from edge_runtime.build.choice import measure_variant
    from edge_runtime.build.engines import build_engine, named_variant, plan_for
    from edge_runtime.build.engines.select import ENGINE_FILES
    from edge_runtime.validate import validate

    assert run.demo is not None and run.facts is not None
    manifest, power = run.demo.manifest, PowerSampler.from_settings(run.settings)
    plan = plan_for(manifest, run.facts, named_variant(manifest, variant), backend=backend, device=device,
                    max_batch_size=TIMING_BATCH, opt_batch_size=TIMING_BATCH)
    engines = run.work / "engines" / backend
    engines.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    engine, _ = build_engine(plan, run.demo.files[variant], engines / f"{variant}{ENGINE_FILES[backend]}",
                             max_batch_size=TIMING_BATCH, timing_cache=engines / "timing.cache")
    build_s = time.monotonic() - started
    try:
        result = validate(engine, run.demo.validation, manifest, variant, power=power)
        figure = PrecisionFigure(variant=variant, backend=backend, target_key=str(plan.target_key),
                                 build_seconds=round(build_s, 3), agreement=result.value, passed=result.passed)
        if result.passed:
            measured = measure_variant(engine, _first_sample(run), TIMING_BATCH, budget_s=run.budget_s, power=power)
            run.figures.setdefault(backend, []).append(measured.figures(variant, str(plan.target_key), result.value))
            figure = figure.model_copy(update={
                "b1_p50_ms": measured.b1.p50_ms, "batched_p50_ms": measured.batched.p50_ms,
                "mj_per_inference": run.figures[backend][-1].mj_per_inference})
    finally:
        engine.close()
    if variant == "fp32" and (run.target_key is None or backend == "tensorrt"):
        run.target_key = str(plan.target_key)
    return figure


def _first_sample(run: _Run) -> dict[str, Any]:
    import numpy as np

    assert run.demo is not None
    with np.load(run.demo.validation, allow_pickle=False) as npz:
        return {"input": npz["inputs"][:1]}


def check_engines(run: _Run, backend: str) -> Outcome:
    """Build, validate and time each demo variant ``backend`` runs here."""
    from edge_runtime.build.engines import candidate_variants

    if backend == "tensorrt" and not (run.facts is not None and run.facts.has_tensorrt):
        return "skipped", "TensorRT or a CUDA GPU is missing: no TensorRT engine can be built here", {}
    if run.demo is None:
        return "skipped", "no demo model (see the demo_model check)", {}
    cuda = run.facts is not None and "CUDAExecutionProvider" in run.facts.ort_providers
    device = "trt" if backend == "tensorrt" else ("cuda" if cuda else "cpu")
    names = [v.name for v in candidate_variants(run.demo.manifest, backend, device)]
    built, problems = [], []
    for name in names:
        try:
            figure = _build_and_measure(run, backend, device, name)
        except Exception as exc:  # noqa: BLE001 - one variant's failure is reported, the others still run
            problems.append(f"{name}: {describe(exc)}")
            continue
        run.precision.append(figure)
        built.append(name)
        if not figure.passed:
            problems.append(f"{name}: top-1 agreement with FP32 {figure.agreement:.3f}")
    if problems:
        return "failed", "; ".join(problems), {"built": built}
    return "ok", f"built, validated and timed {', '.join(built)}", {"built": built}


def check_precision(run: _Run) -> Outcome:
    """Which TensorRT precision wins here (the runtime's balanced score), and whether INT8 lost to FP16."""
    from edge_runtime.build.choice import choose_variant

    figures = run.figures.get("tensorrt", [])
    if not figures:
        return "skipped", "no TensorRT engine was timed: fp16 vs int8-qdq vs fp32 needs TensorRT", {}
    choice = choose_variant(figures, "balanced")
    assert choice is not None
    run.winner = choice.chosen
    scores = {f.variant: round(f.score_ms, 4) for f in figures}
    reason = f"{choice.chosen} wins: {choice.reason}"
    if "int8-qdq" in scores and "fp16" in scores and scores["int8-qdq"] > scores["fp16"]:
        reason += ("; int8-qdq lost to fp16 (strongly typed INT8 keeps the unquantized layers in FP32: quantize more "
                   "of the network, or serve fp16 on this device)")
    return "ok", reason, {"score_ms": scores, "energy": choose_variant(figures, "energy").to_dict()["reason"]}  # type: ignore[union-attr]


def check_gpu_tests(run: _Run) -> Outcome:
    """``pytest -m gpu`` on the installed tests (the engine conformance class over TensorRT and the TensorRT path)."""
    if not run.gpu:
        return "skipped", "no CUDA GPU here (see the cuda check): the GPU conformance tests need one", {}
    if not run.run_tests:
        return "skipped", "turned off (--no-tests)", {}
    if run.tests is None or not (run.tests / "edge_runtime").is_dir():
        return "skipped", "the tests are not installed here (run from a source checkout, or pass --tests)", {}
    if importlib.util.find_spec("pytest") is None:
        return "skipped", "pytest is not installed (pip install pytest pytest-timeout)", {}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           str(run.tests / "edge_runtime")], cwd=run.tests.parent, capture_output=True, text=True,
                          timeout=900, check=False)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode == 5 or (done.returncode == 0 and " passed" not in summary):
        return "skipped", f"no GPU test ran: {summary}", {"output_tail": done.stdout[-4000:]}
    return ("ok" if done.returncode == 0 else "failed"), summary, {"returncode": done.returncode,
                                                                    "output_tail": done.stdout[-4000:]}


def _check_libraries_script(source_root: Path | None) -> ModuleType | None:
    """``check_libraries.py`` (the images' ldd check) loaded from a source checkout or the image, or ``None``."""
    for candidate in CHECK_LIBRARIES:
        path = (source_root / candidate) if source_root is not None and not candidate.startswith("/") \
            else Path(candidate)
        if path.is_file():
            spec = importlib.util.spec_from_file_location("edgeloop_check_libraries", path)
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
    return None


@contextmanager
def _library_path(extra: str | None) -> Iterator[None]:
    """``LD_LIBRARY_PATH`` with ``extra`` first while the block runs (ldd, run by the script, inherits it)."""
    old = os.environ.get("LD_LIBRARY_PATH")
    if extra:
        os.environ["LD_LIBRARY_PATH"] = extra
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = old


def _ldd(script: ModuleType, files: list[Path], env: dict[str, str]) -> Outcome:
    """Every library ``files`` need, resolved by ``ldd`` (the script's check)."""
    broken = {}
    with _library_path(env.get("LD_LIBRARY_PATH")):
        for path in files:
            missing = script.missing_libraries(path, [])
            if missing:
                broken[str(path)] = missing
    if broken:
        first, libs = next(iter(broken.items()))
        return "failed", f"{len(broken)} of {len(files)} files miss libraries, e.g. {first} needs " \
            f"{', '.join(libs)} (ldd: not found)", {"missing": broken}
    return "ok", f"{len(files)} files: every library they need resolves", {"files": len(files)}


def check_triton_libraries(run: _Run) -> Outcome:
    """ldd on the Triton the runtime would start (EDGE_TRITON_HOME, EDGE_TRITON_PYTHON, or /opt/tritonserver)."""
    from edge_runtime.serve.triton.dataplane import find_triton

    s = run.settings
    home = s.triton_home or (Path("/opt/tritonserver") if s.triton_python is None else None)
    if home is not None and not (home / "bin" / "tritonserver").exists() and s.triton_home is None:
        return "skipped", "no Triton here (no /opt/tritonserver; set EDGE_TRITON_HOME or EDGE_TRITON_PYTHON)", {}
    script = _check_libraries_script(run.tests.parent if run.tests is not None else None)
    if script is None:
        return "skipped", "check_libraries.py is not here (dockerfiles/ in a checkout, /opt/edgeloop in images)", {}
    if home is not None:  # an install: its binary, libraries and backends, with its lib/ first (as Triton runs)
        folders, env = [home / "bin" / "tritonserver", home / "lib", home / "backends"], {"LD_LIBRARY_PATH": ":".join(
            p for p in (str(home / "lib"), os.environ.get("LD_LIBRARY_PATH")) if p)}
    else:  # the nvidia-pytriton wheel in EDGE_TRITON_PYTHON's virtualenv, as the runtime would start it
        install = find_triton(None, s.triton_python, run.work / "triton", "python")
        folders, env = [install.binary, install.backends], install.env
    files = [f for folder in folders if folder.exists() for f in script.elf_files(folder)]
    if not files:
        return "failed", f"no tritonserver or backend library under {home}", {}
    return _ldd(script, files, env)


def _on_disk(name: str) -> bool:
    """Whether the Python package ``name`` is installed as files (found without importing it)."""
    try:
        spec = importlib.util.find_spec(name)
    except ValueError:  # in sys.modules without a spec: not a package on disk
        return False
    return spec is not None and spec.origin is not None


def check_python_libraries(run: _Run) -> Outcome:
    """ldd on the extension modules of onnxruntime and (where installed) tensorrt."""
    script = _check_libraries_script(run.tests.parent if run.tests is not None else None)
    if script is None:
        return "skipped", "check_libraries.py is not here (dockerfiles/ in a checkout, /opt/edgeloop in images)", {}
    names = [n for n in ("onnxruntime", "tensorrt") if _on_disk(n)]
    return _ldd(script, [f for name in names for f in script.module_files(name)], {})


def run_selfcheck(settings: EdgeSettings, work: Path, *, tests: Path | None = None, run_tests: bool = True,
                  budget_s: float = 1.0) -> SelfcheckReport:
    """Every check in turn (later ones use what earlier ones found), as one report. ``work`` holds the demo model
    and its engines; ``budget_s`` is the timing per variant, seconds."""
    run = _Run(settings, work, tests, run_tests, budget_s)
    checks = [_timed("device", lambda: check_device(run)), _timed("cuda", lambda: check_cuda(run)),
              _timed("tensorrt", lambda: check_tensorrt(run)), _timed("power_rails", lambda: check_power(run)),
              _timed("demo_model", lambda: check_demo_model(run)),
              _timed("tensorrt_engines", lambda: check_engines(run, "tensorrt")),
              _timed("onnxruntime_engines", lambda: check_engines(run, "onnxruntime")),
              _timed("precision", lambda: check_precision(run)),
              _timed("gpu_conformance_tests", lambda: check_gpu_tests(run)),
              _timed("triton_libraries", lambda: check_triton_libraries(run)),
              _timed("python_libraries", lambda: check_python_libraries(run))]
    return SelfcheckReport(
        created_at=datetime.now(timezone.utc), hostname=socket.gethostname(), edgeloop_version=_version(),
        device=run.facts.to_dict() if run.facts is not None else {}, backend=run.backend, target_key=run.target_key,
        checks=checks, precision=run.precision, winner=run.winner, ok=all(c.status != "failed" for c in checks))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeloop")
    except PackageNotFoundError:
        return "unknown"
