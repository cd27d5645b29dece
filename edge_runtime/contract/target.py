"""Target keys: everything that makes a built engine non-portable, in one string.

Examples::

    trt10.3-sm87-l4t36.4-int8-b1x16x32   TensorRT 10.3, compute capability 8.7, L4T r36.4, INT8, batch 1/16/32
    trt11.0-sm90-int8-b1x16x64           TensorRT 11 on a discrete GPU (no L4T release)
    ort1.31-cpu-x86_64-int8              ONNX Runtime 1.31 on an x86-64 CPU

The string is a path segment in S3 (``engines/<target-key>/``) and a cache directory name on the device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edge_runtime.errors import ConfigError

_PRECISIONS = ("fp32", "fp16", "int8")
_TRT = re.compile(
    r"^trt(?P<ver>\d+\.\d+)-sm(?P<sm>\d{2,3})(?:-l4t(?P<l4t>\d+\.\d+))?-(?P<prec>fp32|fp16|int8)"
    r"-b(?P<bmin>\d+)x(?P<bopt>\d+)x(?P<bmax>\d+)$"
)
_ORT = re.compile(r"^ort(?P<ver>\d+\.\d+)-(?P<dev>cpu|cuda|trt)-(?P<arch>x86_64|aarch64)-(?P<prec>fp32|fp16|int8)$")


def _major_minor(version: str) -> str:
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ConfigError(f"expected a version like 10.3 or 1.31.0, got {version!r}")
    return f"{int(parts[0])}.{int(parts[1])}"


@dataclass(frozen=True)
class TargetKey:
    """A parsed target key; ``str(key)`` gives the canonical string."""

    backend: Literal["tensorrt", "onnxruntime"]
    backend_version: str
    precision: Literal["fp32", "fp16", "int8"]
    compute_capability: str | None = None
    """``"87"`` for sm_87 (Orin); TensorRT only."""
    l4t_release: str | None = None
    """``"36.4"`` on Jetson (from /etc/nv_tegra_release); ``None`` on a discrete GPU."""
    batch_profile: tuple[int, int, int] | None = None
    """(min, opt, max) batch of the optimization profile; TensorRT only."""
    device: Literal["cpu", "cuda", "trt"] = "cpu"
    """ONNX Runtime execution provider family."""
    arch: Literal["x86_64", "aarch64"] = "x86_64"

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend_version", _major_minor(self.backend_version))
        if self.precision not in _PRECISIONS:
            raise ConfigError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.backend == "tensorrt":
            if not self.compute_capability or self.batch_profile is None:
                raise ConfigError("a TensorRT target key needs a compute capability and a batch profile")
            lo, opt, hi = self.batch_profile
            if not 1 <= lo <= opt <= hi:
                raise ConfigError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.batch_profile}")

    def __str__(self) -> str:
        if self.backend == "tensorrt":
            assert self.batch_profile is not None
            l4t = f"-l4t{self.l4t_release}" if self.l4t_release else ""
            lo, opt, hi = self.batch_profile
            return f"trt{self.backend_version}-sm{self.compute_capability}{l4t}-{self.precision}-b{lo}x{opt}x{hi}"
        return f"ort{self.backend_version}-{self.device}-{self.arch}-{self.precision}"

    @classmethod
    def parse(cls, text: str) -> TargetKey:
        """Parse a target key string; :class:`ConfigError` names what is wrong with it."""
        if match := _TRT.match(text):
            return cls(
                backend="tensorrt",
                backend_version=match["ver"],
                compute_capability=match["sm"],
                l4t_release=match["l4t"],
                precision=match["prec"],  # type: ignore[arg-type]
                batch_profile=(int(match["bmin"]), int(match["bopt"]), int(match["bmax"])),
                device="trt",
                arch="aarch64" if match["l4t"] else "x86_64",
            )
        if match := _ORT.match(text):
            return cls(
                backend="onnxruntime",
                backend_version=match["ver"],
                precision=match["prec"],  # type: ignore[arg-type]
                device=match["dev"],  # type: ignore[arg-type]
                arch=match["arch"],  # type: ignore[arg-type]
            )
        raise ConfigError(
            f"not a target key: {text!r} (expected e.g. trt10.3-sm87-l4t36.4-int8-b1x16x32 or ort1.31-cpu-x86_64-int8)"
        )
