"""Choose the backend and variant for this device, and build (or load the cached) engine under its target key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.build.device import DeviceFacts
from edge_runtime.build.engines.base import Engine
from edge_runtime.build.jetpack import check_jetson_support
from edgeloop_core.contract import Manifest, TargetKey, Variant
from edgeloop_core.errors import ConfigError, EngineError

# Preference order of variants per backend (first present in the manifest wins).
PREFERENCE = {
    "tensorrt": ("int8-qdq", "fp16", "fp32", "fp32-dense"),
    "onnxruntime-cpu": ("int8-ort", "fp32", "fp32-dense"),
    "onnxruntime-cuda": ("fp16", "fp32", "fp32-dense"),
}
ENGINE_FILES = {"tensorrt": ".plan", "onnxruntime": ".ort.onnx"}
"""Engine file suffix per backend; the file is named after the variant (two fp32 variants share a target key)."""


@dataclass(frozen=True)
class EnginePlan:
    """Which variant, on which backend, under which target key."""

    backend: str
    variant: Variant
    target_key: TargetKey
    device: str

    @property
    def engine_file(self) -> str:
        """File name of the built engine in the cache (and in S3 for shared engines): ``<variant>.plan`` or
        ``<variant>.ort.onnx``. The variant is in the name because the target key names the hardware and the
        precision only: ``fp32`` and ``fp32-dense`` share one."""
        return f"{self.variant.name}{ENGINE_FILES[self.backend]}"

    @property
    def timing_cache_file(self) -> str:
        """Name of the TensorRT timing cache this plan may share: one per TensorRT build and device (not per model
        or version), since timings depend on nothing else."""
        key = self.target_key
        return (f"trt{key.backend_version}-sm{key.compute_capability}x{key.sm_count or 0}-{key.module or 'gpu'}"
                f"-{key.arch}.cache")

    @property
    def record_file(self) -> str:
        """File name of a shared engine's record (its digest and builder) next to it in S3."""
        return f"{self.variant.name}.json"


def resolve_backend(facts: DeviceFacts, backend: str = "auto", *,
                    allow_cpu_fallback: bool = False) -> tuple[str, str]:
    """``(backend, device)`` for this device: TensorRT where TensorRT and a GPU exist, else ONNX Runtime on CUDA
    (when its CUDA provider is present) or the CPU. An explicit ``backend`` must be usable here.

    On a Jetson, ``auto`` never falls back to the CPU silently: when TensorRT is unusable it raises (the runtime
    reports it and serves nothing) unless ``allow_cpu_fallback`` says a CPU is acceptable.
    """
    if backend == "auto":
        if facts.has_tensorrt:
            backend = "tensorrt"
        elif facts.is_jetson and not allow_cpu_fallback:
            why = facts.trt_error or "TensorRT is not installed in this image"
            raise EngineError(
                f"this is a Jetson ({facts.module or 'module unknown'}, L4T r{facts.l4t_release or '?'}) but TensorRT "
                f"is unusable: {why}. Fix the pod (video/render groups, nvidia runtime class), or set "
                f"EDGE_BACKEND=onnxruntime or EDGE_ALLOW_CPU_FALLBACK=true to serve on the CPU")
        else:
            backend = "onnxruntime"
    if backend == "tensorrt" and not facts.has_tensorrt:
        raise ConfigError("backend 'tensorrt' requested, but TensorRT or a CUDA GPU is missing on this device"
                          + (f": {facts.trt_error}" if facts.trt_error else ""))
    if backend == "tensorrt":
        check_jetson_support(facts)
    if backend not in ENGINE_FILES:
        raise ConfigError(f"unknown backend {backend!r}: use auto, tensorrt or onnxruntime")
    device = "cpu"
    if backend == "onnxruntime" and "CUDAExecutionProvider" in facts.ort_providers:
        device = "cuda"
    return backend, device


def candidate_variants(manifest: Manifest, backend: str, device: str) -> list[Variant]:
    """The manifest's variants this backend runs, in preference order: those the pipeline marked preferred
    first, each group in :data:`PREFERENCE` order. Variants the pipeline found not worth it stay candidates (after
    the others) so that a device can still measure them, but never come first."""
    preference = PREFERENCE["tensorrt" if backend == "tensorrt" else f"onnxruntime-{device}"]
    names = [v.name for v in manifest.variants]
    usable = [manifest.variant(n) for n in preference if n in names and backend in manifest.variant(n).backends]
    if not usable:
        raise ConfigError(f"{manifest.name}/{manifest.version} has no variant for {backend} (has {names})")
    return [v for v in usable if v.preferred] + [v for v in usable if not v.preferred]


def named_variant(manifest: Manifest, name: str) -> Variant:
    """The variant ``name`` of ``manifest``, or :class:`ConfigError` listing the ones it has."""
    names = [v.name for v in manifest.variants]
    if name not in names:
        raise ConfigError(f"variant {name!r} is not in {manifest.name}/{manifest.version} (has {names})")
    return manifest.variant(name)


def plan_for(manifest: Manifest, facts: DeviceFacts, variant: Variant, *, backend: str, device: str,
             max_batch_size: int = 16, opt_batch_size: int = 8) -> EnginePlan:
    """The engine plan (and its target key) for one variant on a resolved ``backend``/``device``."""
    if backend not in variant.backends:
        raise ConfigError(f"variant {variant.name!r} of {manifest.name}/{manifest.version} is made for "
                          f"{', '.join(variant.backends)}, not {backend}: choose another variant or backend")
    if backend == "tensorrt":
        assert facts.trt_version is not None
        key = TargetKey(backend="tensorrt", backend_version=facts.trt_version, precision=variant.precision,
                        compute_capability=facts.compute_capability, l4t_release=facts.l4t_release,
                        batch_profile=(1, min(opt_batch_size, max_batch_size), max_batch_size), device="trt",
                        arch="aarch64" if facts.arch == "aarch64" else "x86_64", sm_count=facts.sm_count,
                        module=facts.module)
    else:
        key = TargetKey(backend="onnxruntime", backend_version=facts.ort_version or "0.0", precision=variant.precision,
                        device=device, arch="aarch64" if facts.arch == "aarch64" else "x86_64")  # type: ignore[arg-type]
    return EnginePlan(backend=backend, variant=variant, target_key=key, device=device)


def plan_engine(manifest: Manifest, facts: DeviceFacts, *, backend: str = "auto", variant: str | None = None,
                max_batch_size: int = 16, opt_batch_size: int = 8) -> EnginePlan:
    """Pick backend and variant without measuring: the first of :func:`candidate_variants`, or ``variant`` when
    given (it must exist and suit the backend)."""
    backend, device = resolve_backend(facts, backend)
    chosen = named_variant(manifest, variant) if variant is not None else candidate_variants(manifest, backend,
                                                                                             device)[0]
    return plan_for(manifest, facts, chosen, backend=backend, device=device, max_batch_size=max_batch_size,
                    opt_batch_size=opt_batch_size)


def build_engine(plan: EnginePlan, model_path: Path, engine_path: Path, *, max_batch_size: int,
                 timing_cache: Path | None = None, ort_threads: int = 0,
                 ort_spin: bool | None = None) -> tuple[Engine, bool]:
    """Load the engine at ``engine_path`` if the cache has it, else build it there first (TensorRT: with
    ``timing_cache``, which must be specific to the TensorRT build and the device).

    Returns ``(engine, built)`` where ``built`` says whether this call ran a build.
    """
    built = False
    if plan.backend == "tensorrt":
        from edge_runtime.build.engines.tensorrt import TrtEngine, build_trt

        messages: list[str] = []
        if not engine_path.exists():
            assert plan.target_key.batch_profile is not None
            messages = build_trt(model_path, engine_path, batch_profile=plan.target_key.batch_profile,
                                 timing_cache=timing_cache)
            built = True
        engine = TrtEngine(engine_path, max_batch_size=max_batch_size)
        engine.build_messages = messages
        return engine, built
    from edge_runtime.build.engines.onnxruntime import OrtEngine, build_ort

    if not engine_path.exists():
        build_ort(model_path, engine_path, device=plan.device)
        built = True
    return OrtEngine(engine_path, device=plan.device, max_batch_size=max_batch_size, threads=ort_threads,
                     spin=ort_spin), built
