"""Validate before serving: the version's held-out set through the engine this device built, against the
manifest's reference accuracy (minus tolerance) and, when configured, a batch-1 p99 latency budget."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.build.engines.base import Engine
from edgeloop_core.contract import Manifest
from edgeloop_core.errors import ValidationFailed
from edgeloop_core.quality import output_agreement
from edgeloop_core.timing import time_calls


@dataclass(frozen=True)
class ValidationResult:
    """What validation measured and decided."""

    variant: str
    metric: str
    value: float
    reference: float
    tolerance: float
    samples: int
    p50_ms: float
    p99_ms: float
    latency_budget_p99_ms: float | None
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return asdict(self)

    def summary(self) -> str:
        """One line: ``passed top1_accuracy 0.9944 >= 0.9844 (p99 0.21 ms)``."""
        verdict = "passed" if self.passed else "failed"
        return (f"{verdict} {self.metric} {self.value:.4f} >= {self.reference - self.tolerance:.4f}"
                if self.passed else f"{verdict}: {self.reason}") + f" (p99 {self.p99_ms:.2f} ms)"



def _run_batched(engine: Engine, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    count = len(next(iter(inputs.values())))
    step = max(1, engine.max_batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, step):
        for name, value in engine.infer({k: v[start : start + step] for k, v in inputs.items()}).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def read_validation_set(validation_path: Path, manifest: Manifest,
                        engine: Engine) -> tuple[dict[str, np.ndarray], np.ndarray | dict[str, np.ndarray]]:
    """``(inputs by name, expected)`` from a version's ``validation.npz``.

    ``top1_accuracy``: ``inputs`` and ``labels`` arrays (expected = labels). ``output_agreement`` (imported models):
    ``input:<name>`` arrays for every input and ``reference:<name>`` FP32 outputs (expected = those outputs).
    """
    with np.load(validation_path, allow_pickle=False) as npz:
        if manifest.validation.metric == "output_agreement":
            inputs = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("input:")}
            expected: np.ndarray | dict[str, np.ndarray] = {
                k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("reference:")}
        else:
            inputs, expected = {engine.inputs[0].name: npz["inputs"]}, npz["labels"]
    return inputs, expected


def validate(engine: Engine, validation_path: Path, manifest: Manifest, variant: str, *,
             latency_budget_p99_ms: float | None = None, latency_runs: int = 100) -> ValidationResult:
    """Run the validation set; ``passed`` only if the metric and (when set) latency are within bounds.

    The metric is the manifest's (see :func:`read_validation_set`; ``output_agreement`` compares by
    :func:`output_agreement`). Latency: batch-1 requests cycling through the validation samples.
    """
    spec = manifest.validation
    inputs, expected = read_validation_set(validation_path, manifest, engine)
    outputs = _run_batched(engine, inputs)
    if isinstance(expected, dict):
        value = output_agreement(expected, outputs)
    else:
        value = float((next(iter(outputs.values())).argmax(axis=1) == expected).mean())
    reference = spec.reference.get(variant, max(spec.reference.values()))
    count = len(next(iter(inputs.values())))
    samples = itertools.cycle([{k: v[i : i + 1] for k, v in inputs.items()} for i in range(min(count, latency_runs))])
    timing = time_calls(lambda: engine.infer(next(samples)), runs=max(1, min(latency_runs, count)), warmup=0)
    p50, p99 = timing.p50_ms, timing.p99_ms
    reasons = []
    if value < reference - spec.tolerance - 1e-9:
        reasons.append(f"{spec.metric} {value:.4f} below {reference:.4f} - {spec.tolerance:.4f}")
    if latency_budget_p99_ms is not None and p99 > latency_budget_p99_ms:
        reasons.append(f"batch-1 p99 {p99:.2f} ms over the {latency_budget_p99_ms:.2f} ms budget")
    return ValidationResult(variant=variant, metric=spec.metric, value=value, reference=reference,
                            tolerance=spec.tolerance, samples=count, p50_ms=p50, p99_ms=p99,
                            latency_budget_p99_ms=latency_budget_p99_ms, passed=not reasons,
                            reason="; ".join(reasons))


def require_passed(result: ValidationResult, where: str) -> None:
    """Raise :class:`ValidationFailed` naming ``where`` when ``result`` did not pass."""
    if not result.passed:
        raise ValidationFailed(f"{where} failed validation on this device: {result.reason}")
