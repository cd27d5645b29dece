"""Choose the backend and variant for this device, and build (or load the cached) engine under its target key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.contract import Manifest, TargetKey, Variant
from edge_runtime.device import DeviceFacts
from edge_runtime.engines.base import Engine
from edge_runtime.errors import ConfigError

# Preference order of variants per backend (first present in the manifest wins).
PREFERENCE = {
    "tensorrt": ("int8-qdq", "fp16", "fp32", "fp32-dense"),
    "onnxruntime-cpu": ("int8-ort", "fp32", "fp32-dense"),
    "onnxruntime-cuda": ("fp16", "fp32", "fp32-dense"),
}
ENGINE_FILES = {"tensorrt": "engine.plan", "onnxruntime": "model.ort.onnx"}


@dataclass(frozen=True)
class EnginePlan:
    """Which variant, on which backend, under which target key."""

    backend: str
    variant: Variant
    target_key: TargetKey
    device: str

    @property
    def engine_file(self) -> str:
        """File name of the built engine in the cache (and in S3 for shared TensorRT engines)."""
        return ENGINE_FILES[self.backend]


def plan_engine(manifest: Manifest, facts: DeviceFacts, *, backend: str = "auto", variant: str | None = None,
                max_batch_size: int = 16, opt_batch_size: int = 8) -> EnginePlan:
    """Pick backend and variant: TensorRT with the Q/DQ variant where TensorRT and a GPU exist, else ONNX Runtime
    with the variant that suits its provider. ``backend`` and ``variant`` override the automatic choice."""
    if backend == "auto":
        backend = "tensorrt" if facts.has_tensorrt else "onnxruntime"
    if backend == "tensorrt" and not facts.has_tensorrt:
        raise ConfigError("backend 'tensorrt' requested, but TensorRT or a CUDA GPU is missing on this device")
    if backend not in ENGINE_FILES:
        raise ConfigError(f"unknown backend {backend!r}: use auto, tensorrt or onnxruntime")
    device = "cpu"
    if backend == "onnxruntime" and "CUDAExecutionProvider" in facts.ort_providers:
        device = "cuda"
    preference = PREFERENCE["tensorrt" if backend == "tensorrt" else f"onnxruntime-{device}"]
    names = [v.name for v in manifest.variants]
    if variant is not None:
        if variant not in names:
            raise ConfigError(f"variant {variant!r} is not in {manifest.name}/{manifest.version} (has {names})")
        chosen = manifest.variant(variant)
    else:
        usable = [n for n in preference if n in names and backend in manifest.variant(n).backends]
        if not usable:
            raise ConfigError(f"{manifest.name}/{manifest.version} has no variant for {backend} (has {names})")
        chosen = manifest.variant(usable[0])
    if backend == "tensorrt":
        assert facts.trt_version is not None
        key = TargetKey(backend="tensorrt", backend_version=facts.trt_version, precision=chosen.precision,
                        compute_capability=facts.compute_capability, l4t_release=facts.l4t_release,
                        batch_profile=(1, min(opt_batch_size, max_batch_size), max_batch_size), device="trt",
                        arch="aarch64" if facts.arch == "aarch64" else "x86_64")
    else:
        key = TargetKey(backend="onnxruntime", backend_version=facts.ort_version or "0.0", precision=chosen.precision,
                        device=device, arch="aarch64" if facts.arch == "aarch64" else "x86_64")  # type: ignore[arg-type]
    return EnginePlan(backend=backend, variant=chosen, target_key=key, device=device)


def build_engine(plan: EnginePlan, model_path: Path, engine_path: Path, *, max_batch_size: int) -> tuple[Engine, bool]:
    """Load the engine at ``engine_path`` if the cache has it, else build it there first.

    Returns ``(engine, built)`` where ``built`` says whether this call ran a build.
    """
    built = False
    if plan.backend == "tensorrt":
        from edge_runtime.engines.tensorrt import TrtEngine, build_trt

        if not engine_path.exists():
            assert plan.target_key.batch_profile is not None
            build_trt(model_path, engine_path, batch_profile=plan.target_key.batch_profile,
                      timing_cache=engine_path.parent.parent / "timing.cache")
            built = True
        return TrtEngine(engine_path, max_batch_size=max_batch_size), built
    from edge_runtime.engines.onnxruntime import OrtEngine, build_ort

    if not engine_path.exists():
        build_ort(model_path, engine_path, device=plan.device)
        built = True
    return OrtEngine(engine_path, device=plan.device, max_batch_size=max_batch_size), built
