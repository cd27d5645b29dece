"""Engines that run a model on this device: TensorRT on a GPU, ONNX Runtime elsewhere.

``select_backend`` picks one from the device's facts and the manifest; ``build_engine`` builds (or loads the cached
build for this target key) and returns something with ``infer``.
"""

from edge_runtime.build.engines.base import Engine, TensorInfo
from edge_runtime.build.engines.select import (
    EnginePlan,
    build_engine,
    candidate_variants,
    named_variant,
    plan_engine,
    plan_for,
    resolve_backend,
)

__all__ = ["Engine", "EnginePlan", "TensorInfo", "build_engine", "candidate_variants", "named_variant", "plan_engine",
           "plan_for", "resolve_backend"]
