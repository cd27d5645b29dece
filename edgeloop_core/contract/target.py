"""Target keys: everything that makes a built engine non-portable, in one string.

Examples::

    trt10.3.0.30-sm87x8-orin-nx-l4t36.4-aarch64-int8-b1x8x16
        TensorRT 10.3.0.30 (plans are valid for one exact build), compute capability 8.7 with 8 SMs, on a Jetson
        Orin NX (Nano, NX and AGX Orin are all sm_87 and all call themselves "Orin": the module tells them apart),
        L4T r36.4, aarch64, INT8, optimization profile batch 1/8/16
    trt11.0.0.114-sm90x132-x86_64-fp16-b1x8x64
        TensorRT 11 on a discrete GPU (no module, no L4T release)
    trt10.3.0.30-sm90x132-aarch64-int8-b1x8x16
        an ARM server with a discrete GPU (aarch64 without L4T)
    ort1.31-cpu-x86_64-int8
        ONNX Runtime 1.31 on an x86-64 CPU

The string is a path segment in S3 (``engines/<target-key>/``) and a cache directory name on the device;
:meth:`TargetKey.parse` reads it back (round-trip tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgeloop_core.errors import ConfigError

_PRECISIONS = ("fp32", "fp16", "int8")
_TRT = re.compile(
    r"^trt(?P<ver>\d+\.\d+(?:\.\d+){0,2})-sm(?P<sm>\d{2,3})(?:x(?P<sms>\d+))?"
    r"(?:-(?P<module>[a-z][a-z0-9]*(?:-[a-z0-9]+)*?))??(?:-l4t(?P<l4t>\d+\.\d+))?"
    r"(?:-(?P<arch>x86_64|aarch64))?-(?P<prec>fp32|fp16|int8)-b(?P<bmin>\d+)x(?P<bopt>\d+)x(?P<bmax>\d+)$"
)
_ORT = re.compile(r"^ort(?P<ver>\d+\.\d+)-(?P<dev>cpu|cuda|trt)-(?P<arch>x86_64|aarch64)-(?P<prec>fp32|fp16|int8)$")
_MODULE = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


def _major_minor(version: str) -> str:
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ConfigError(f"expected a version like 10.3 or 1.31.0, got {version!r}")
    return f"{int(parts[0])}.{int(parts[1])}"


def _full_version(version: str) -> str:
    parts = version.split("+")[0].split(".")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"expected a TensorRT build like 10.3.0.30, got {version!r}")
    return ".".join(str(int(p)) for p in parts)


def module_slug(text: str | None) -> str | None:
    """``NVIDIA Jetson Orin NX Engineering Reference Developer Kit`` → ``orin-nx``; ``None`` for nothing usable.

    The words every module shares (NVIDIA, Jetson, Developer Kit, ...) are dropped so keys stay short.
    """
    if not text:
        return None
    words = re.findall(r"[a-z0-9]+", text.lower().replace("\x00", " "))
    noise = {"nvidia", "jetson", "engineering", "reference", "developer", "kit", "devkit", "module", "p3768", "p3767",
             "p3737", "p3701", "p3740"}
    kept = [w for w in words if w not in noise]
    slug = "-".join(kept)[:40].strip("-")
    return slug if slug and _MODULE.match(slug) else None


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
    sm_count: int | None = None
    """Streaming multiprocessors of the GPU; TensorRT only (tactics are chosen for it)."""
    module: str | None = None
    """Jetson module slug (``orin-nx``, ``orin-nano``, ``agx-orin``); ``None`` on a discrete GPU."""

    def __post_init__(self) -> None:
        if self.backend == "tensorrt":
            object.__setattr__(self, "backend_version", _full_version(self.backend_version))
        else:
            object.__setattr__(self, "backend_version", _major_minor(self.backend_version))
        if self.module is not None and not _MODULE.match(self.module):
            raise ConfigError(f"a module name must be a lower-case slug like orin-nx, got {self.module!r}")
        if self.arch not in ("x86_64", "aarch64"):
            raise ConfigError(f"arch must be x86_64 or aarch64, got {self.arch!r}")
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
            sms = f"x{self.sm_count}" if self.sm_count else ""
            module = f"-{self.module}" if self.module else ""
            l4t = f"-l4t{self.l4t_release}" if self.l4t_release else ""
            lo, opt, hi = self.batch_profile
            return (f"trt{self.backend_version}-sm{self.compute_capability}{sms}{module}{l4t}-{self.arch}"
                    f"-{self.precision}-b{lo}x{opt}x{hi}")
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
                arch=match["arch"] or ("aarch64" if match["l4t"] else "x86_64"),  # type: ignore[arg-type]
                sm_count=int(match["sms"]) if match["sms"] else None,
                module=match["module"],
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
            f"not a target key: {text!r} (expected e.g. trt10.3.0.30-sm87x8-orin-nx-l4t36.4-aarch64-int8-b1x8x16 or "
            f"ort1.31-cpu-x86_64-int8)"
        )
