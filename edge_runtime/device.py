"""What this device is: CPU architecture, ONNX Runtime, and (where present) TensorRT, the GPU and the L4T release.

The facts choose the backend and the variant, make the target key, and go upstream in telemetry.
"""

from __future__ import annotations

import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


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
    notes: list[str] = field(default_factory=list)

    @property
    def has_tensorrt(self) -> bool:
        """TensorRT importable and a CUDA GPU visible."""
        return self.trt_version is not None and self.compute_capability is not None

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


def detect(tegra_release: Path = NV_TEGRA_RELEASE) -> DeviceFacts:
    """Probe this machine; every probe that fails is left out with a note, never an error."""
    notes: list[str] = []
    ort_version, providers = None, ()
    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, tuple(ort.get_available_providers())
    except ImportError:
        notes.append("onnxruntime not installed")
    trt_version = gpu = cc = None
    dla = 0
    try:
        import tensorrt as trt

        trt_version = trt.__version__
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        dla = int(getattr(builder, "num_DLA_cores", 0) or 0)
        gpu, cc = _cuda_device()
    except ImportError:
        notes.append("TensorRT not installed: ONNX Runtime serves")
    except Exception as exc:  # noqa: BLE001 - a broken driver must not stop the runtime, ORT still works
        notes.append(f"TensorRT present but unusable: {exc}")
    l4t = None
    if tegra_release.exists():
        l4t = parse_l4t_release(tegra_release.read_text(errors="replace"))
    return DeviceFacts(arch=_arch(), ort_version=ort_version, ort_providers=providers, trt_version=trt_version,
                       gpu_name=gpu, compute_capability=cc, l4t_release=l4t, dla_cores=dla, notes=notes)


def _cuda_device() -> tuple[str | None, str | None]:
    """Name and compute capability of GPU 0 through cuda-python, when it is installed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None, None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None, None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}{props.minor}"
