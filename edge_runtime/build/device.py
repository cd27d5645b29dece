"""What this device is: CPU architecture, ONNX Runtime, and (where present) TensorRT, the GPU and the L4T release.

The facts choose the backend and the variant, make the target key, and go upstream in telemetry.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeloop_core.contract.target import module_slug

if TYPE_CHECKING:
    from collections.abc import Mapping

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_MODEL = Path("/proc/device-tree/model")
"""The module's name on a Jetson (``NVIDIA Jetson Orin NX Engineering Reference Developer Kit``); the chart mounts the
host's copy read-only, or passes the ``edgeloop.io/module`` node label where it cannot be mounted."""


@dataclass(frozen=True)
class DeviceFacts:
    """Detected once at start-up."""

    arch: str
    ort_version: str | None = None
    ort_providers: tuple[str, ...] = ()
    trt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    """``"87"`` for sm_87."""
    l4t_release: str | None = None
    """``"36.4"`` from ``/etc/nv_tegra_release`` (R36 (release), REVISION: 4.0)."""
    dla_cores: int = 0
    sm_count: int | None = None
    """Streaming multiprocessors of GPU 0."""
    module: str | None = None
    """Jetson module slug (``orin-nx``) from the device-tree model or a node label."""
    trt_error: str | None = None
    """Why TensorRT is unusable although it is installed (no GPU visible to this user, a driver error)."""
    notes: list[str] = field(default_factory=list)

    @property
    def has_tensorrt(self) -> bool:
        """TensorRT importable and a CUDA GPU visible."""
        return self.trt_version is not None and self.compute_capability is not None

    @property
    def is_jetson(self) -> bool:
        """An L4T release or a Jetson module was found: this device is meant to run TensorRT."""
        return self.l4t_release is not None or self.module is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return asdict(self)


def parse_l4t_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.0, ...`` → ``"36.4"``."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)", text)
    return f"{match[1]}.{match[2]}" if match else None


def _arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


SCRATCH_VARIABLES = ("TMPDIR", "CUDA_CACHE_PATH")
"""Folders CUDA, TensorRT and Triton write scratch files to: the chart points both into the cache volume (``/tmp`` is a
small emptyDir, and passing its limit evicts the pod)."""


def prepare_scratch(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Create the folders :data:`SCRATCH_VARIABLES` name, before CUDA first compiles a kernel or TensorRT first
    writes a temporary file (a ``TMPDIR`` that does not exist makes them fall back to ``/tmp``). Returns a note for
    each folder that cannot be created; never raises."""
    notes = []
    for variable in SCRATCH_VARIABLES:
        folder = environ.get(variable)
        if not folder:
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            notes.append(f"{variable}={folder} cannot be created ({exc.strerror or exc}): scratch files go to /tmp")
    return notes


def detect(tegra_release: Path = NV_TEGRA_RELEASE, device_model: Path = DEVICE_MODEL,
           module: str | None = None) -> DeviceFacts:
    """Probe this machine; every probe that fails is left out with a note, never an error. ``module`` (a node
    label or setting) names the Jetson module where the device-tree model cannot be read. The scratch folders
    (:func:`prepare_scratch`) are created first: this is the runtime's first touch of CUDA."""
    notes: list[str] = prepare_scratch()
    ort_version, providers = None, ()
    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, tuple(ort.get_available_providers())
    except ImportError:
        notes.append("onnxruntime not installed")
    trt_version = gpu = cc = sms = trt_error = None
    dla = 0
    try:
        import tensorrt as trt

        trt_version = trt.__version__
        gpu, cc, sms, cuda_error = _cuda_device()
        if cuda_error:
            trt_error = cuda_error
        else:
            builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
            dla = int(getattr(builder, "num_DLA_cores", 0) or 0)
    except ImportError:
        notes.append("TensorRT not installed: ONNX Runtime serves")
    except Exception as exc:  # noqa: BLE001 - a broken driver must not stop the runtime; the backend choice says so
        trt_error = f"{type(exc).__name__}: {exc}"
    if trt_error:
        gpu = cc = sms = None
        notes.append(f"TensorRT present but unusable: {trt_error}")
    l4t = None
    if tegra_release.exists():
        l4t = parse_l4t_release(tegra_release.read_text(errors="replace"))
    try:
        model_text = device_model.read_text(errors="replace") if device_model.exists() else None
    except OSError:
        model_text = None
    return DeviceFacts(arch=_arch(), ort_version=ort_version, ort_providers=providers, trt_version=trt_version,
                       gpu_name=gpu, compute_capability=cc, l4t_release=l4t, dla_cores=dla, sm_count=sms,
                       module=module_slug(module) or module_slug(model_text), trt_error=trt_error, notes=notes)


CUDA_ERROR_HINTS = {
    100: "no CUDA-capable device is visible to this process: on Jetson the pod needs the video (44) and render "
         "groups (the chart's gpu.supplementalGroups) and the nvidia runtime class",
    35: "the CUDA driver is older than the CUDA runtime in this image",
    801: "operation not supported (error 801): on Jetson usually the missing video/render group",
}


def _cuda_device() -> tuple[str | None, str | None, int | None, str | None]:
    """``(name, compute capability, SM count, error)`` of GPU 0 through cuda-python (error: why there is none)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None, None, None, "cuda-python is not installed (pip install cuda-python)"
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        code = int(err)
        return None, None, None, f"CUDA error {code}: {CUDA_ERROR_HINTS.get(code, 'see the CUDA documentation')}"
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}{props.minor}", int(props.multiProcessorCount), None
