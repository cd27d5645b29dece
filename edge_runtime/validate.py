"""Validate before serving: the version's held-out set through the engine this device built, judged by the model's
task (:mod:`edgeloop_core.quality`) against the manifest's reference (minus tolerance) and, when configured, a
batch-1 p99 latency budget. Where the device has power rails, the batch-1 latency run also gives the module's energy
per inference (:mod:`edge_runtime.build.power`)."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.build.engines.base import Engine
from edge_runtime.build.power import PowerSampler, time_with_energy
from edgeloop_core.contract import Manifest
from edgeloop_core.detection import decode, detection_map
from edgeloop_core.errors import ValidationFailed
from edgeloop_core.quality import (
    CONTROL_MARGIN,
    label_free_value,
    output_agreement,
    tensor_agreement,
    top1_accuracy,
)


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
    mj_per_inference: float | None = None
    """Module energy per inference during the batch-1 latency run, mJ; ``None`` where there are no power rails."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return asdict(self)

    def summary(self) -> str:
        """One line: ``passed top1_accuracy 0.9944 >= 0.9844 (p99 0.21 ms)``."""
        verdict = "passed" if self.passed else "failed"
        energy = "" if self.mj_per_inference is None else f", {self.mj_per_inference:.3f} mJ/inference"
        return (f"{verdict} {self.metric} {self.value:.4f} >= {self.reference - self.tolerance:.4f}"
                if self.passed else f"{verdict}: {self.reason}") + f" (p99 {self.p99_ms:.2f} ms{energy})"



def _run_batched(engine: Engine, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    count = len(next(iter(inputs.values())))
    step = max(1, engine.max_batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, step):
        for name, value in engine.infer({k: v[start : start + step] for k, v in inputs.items()}).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


@dataclass(frozen=True)
class ValidationSet:
    """A version's ``validation.npz``: the inputs, and what the outputs are judged against.

    Arrays: ``inputs`` (the model's one input) or ``input:<name>`` for each input; ``labels`` (class per sample);
    ``reference:<output>`` (the FP32 model's outputs, for the label-free metrics); ``coco`` (COCO-format labels as
    JSON text, for ``detection_map50``)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    reference: dict[str, np.ndarray] | None = None
    coco: dict[str, Any] | None = None


def read_validation_set(validation_path: Path, manifest: Manifest, engine: Engine) -> ValidationSet:
    """The arrays of ``validation.npz`` (see :class:`ValidationSet`); never unpickles anything."""
    with np.load(validation_path, allow_pickle=False) as npz:
        inputs = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("input:")}
        if not inputs:
            inputs = {engine.inputs[0].name: npz["inputs"]}
        reference = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("reference:")}
        labels = npz["labels"] if "labels" in npz.files else None
        coco = json.loads(str(npz["coco"])) if "coco" in npz.files else None
    return ValidationSet(inputs, labels, reference or None, coco)


def _missing(what: str, metric: str) -> ValidationFailed:
    return ValidationFailed(f"validation.npz has no {what}, which {metric} needs: publish it again")


def measure(manifest: Manifest, outputs: dict[str, np.ndarray], data: ValidationSet) -> tuple[float, str]:
    """The manifest's metric of ``outputs`` on ``data``, and a detail line (the worst output or slice) or ``""``."""
    metric, task = manifest.validation.metric, manifest.task
    if metric == "top1_accuracy":
        if data.labels is None:
            raise _missing("labels", metric)
        return top1_accuracy(outputs, data.labels, task), ""
    if metric == "detection_map50":
        if data.coco is None:
            raise _missing("COCO labels", metric)
        return detection_map(decode(outputs, task), data.coco)[0], ""
    if data.reference is None:
        raise _missing("FP32 reference outputs", metric)
    if metric == "output_agreement":  # schema 2: one cosine, but a collapsed output fails all the same
        collapsed = [p for p in tensor_agreement(data.reference, outputs).parts if p.collapsed]
        if collapsed:
            return 0.0, f"{collapsed[0].part} {collapsed[0].reason}"
        return output_agreement(data.reference, outputs), ""
    agreement = tensor_agreement(data.reference, outputs, task.slices)
    worst = agreement.worst()
    detail = ""
    if worst is not None and (worst.collapsed or (metric == "tensor_agreement" and len(agreement.parts) > 1)):
        detail = f"worst part {worst.part} {worst.score:.4f} {worst.reason}".rstrip()
    if metric == "tensor_agreement":
        return agreement.value, detail
    return label_free_value(metric, data.reference, outputs, task), detail  # 0.0 for a collapsed part


def validate(engine: Engine, validation_path: Path, manifest: Manifest, variant: str, *,
             latency_budget_p99_ms: float | None = None, latency_runs: int = 100,
             power: PowerSampler | None = None) -> ValidationResult:
    """Run the validation set; ``passed`` only if the task's metric and (when set) latency are within bounds.

    The metric is the manifest's (:func:`measure`: top-1 or mAP against labels, or agreement with the FP32 model
    judged by the task). Latency: batch-1 requests cycling through the validation samples, with the module's energy
    per inference where ``power`` has rails.
    """
    spec = manifest.validation
    data = read_validation_set(validation_path, manifest, engine)
    outputs = _run_batched(engine, data.inputs)
    value, detail = measure(manifest, outputs, data)
    reference = spec.reference.get(variant, max(spec.reference.values()))
    count = len(next(iter(data.inputs.values())))
    samples = itertools.cycle([{k: v[i : i + 1] for k, v in data.inputs.items()}
                               for i in range(min(count, latency_runs))])
    timing, mj = time_with_energy(lambda: engine.infer(next(samples)), 1, power=power,
                                  runs=max(1, min(latency_runs, count)), warmup=0)
    p50, p99 = timing.p50_ms, timing.p99_ms
    reasons = []
    if value < reference - spec.tolerance - 1e-9:
        reasons.append(f"{spec.metric} {value:.4f} below {reference:.4f} - {spec.tolerance:.4f}"
                       + (f" ({detail})" if detail else ""))
    if spec.control is not None and value <= spec.control + CONTROL_MARGIN:
        reasons.append(f"{spec.metric} {value:.4f} is no better than outputs paired with the wrong samples "
                       f"({spec.control:.4f})")
    if latency_budget_p99_ms is not None and p99 > latency_budget_p99_ms:
        reasons.append(f"batch-1 p99 {p99:.2f} ms over the {latency_budget_p99_ms:.2f} ms budget")
    return ValidationResult(variant=variant, metric=spec.metric, value=value, reference=reference,
                            tolerance=spec.tolerance, samples=count, p50_ms=p50, p99_ms=p99,
                            latency_budget_p99_ms=latency_budget_p99_ms, passed=not reasons,
                            reason="; ".join(reasons), mj_per_inference=mj)


def require_passed(result: ValidationResult, where: str) -> None:
    """Raise :class:`ValidationFailed` naming ``where`` when ``result`` did not pass."""
    if not result.passed:
        raise ValidationFailed(f"{where} failed validation on this device: {result.reason}")
