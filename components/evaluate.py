"""Evaluate every exported variant on the test set with ONNX Runtime (CPU) and apply the quality gate.

Each variant is judged by its task: classifiers by top-1 accuracy against the labels, detectors
(:func:`evaluate_detector_variants`) by COCO mAP@0.5 (and mAP@0.5:0.95) against the test set's boxes, decoded and
suppressed as the device does. Besides that score, size and latency, each variant gets its speed-up against
``fp32-dense`` and ``fp32`` (pruned) at batch 1 and 16. A CPU INT8 variant (``ort-qdq``) whose speed-up over
``fp32`` stays below ``min_speedup`` at either batch is published as not preferred, with the reason in the report:
devices then serve FP32 unless told otherwise (and each device measures again on itself before it chooses).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.export import INPUT_NAME, VariantInfo
from edgeloop_core.errors import ConfigError, GateFailed
from edgeloop_core.timing import time_calls

if TYPE_CHECKING:
    import onnxruntime as ort

BASELINE = "fp32-dense"
PRUNED = "fp32"
CPU_QUANTIZATIONS = ("ort-qdq",)
"""Quantizations made for ONNX Runtime on CPUs: the ones this step's CPU timings speak for. (``modelopt-qdq`` is
for TensorRT, whose speed only a GPU can tell.)"""


@dataclass
class VariantEvaluation:
    """Measured figures of one variant."""

    name: str
    precision: str
    quantization: str
    pruned: bool
    params: int
    flops: int
    size_bytes: int
    accuracy: float
    latency_ms_b1: float
    latency_ms_b16: float
    drop_points: float = 0.0
    """Accuracy points lost against the baseline (positive = worse)."""
    confusion: list[list[int]] = field(default_factory=list)
    speedup: dict[str, float] = field(default_factory=dict)
    """``b1_vs_fp32-dense``, ``b16_vs_fp32-dense``, ``b1_vs_fp32``, ``b16_vs_fp32``: reference ms ÷ this ms."""
    preferred: bool = True
    note: str = ""
    """Why the variant is not preferred (empty when it is)."""
    map50_95: float | None = None
    """Detectors: COCO mAP@0.5:0.95 on the test set (``accuracy`` holds mAP@0.5, the figure the gate judges)."""


@dataclass
class Evaluation:
    """All variants, the gate's verdict and why."""

    baseline: str
    tolerance_points: float
    variants: list[VariantEvaluation]
    passed: bool
    failures: list[str]
    min_speedup: float = 1.0
    calibration: dict = field(default_factory=dict)
    """What the INT8 calibration saw: ``samples``, ``seed``, ``histogram`` (rows per class)."""
    metric: str = "top1_accuracy"
    """What each variant's ``accuracy`` is: ``top1_accuracy``, or ``detection_map50`` (COCO mAP@0.5) for detectors
    (the manifest's validation metric)."""
    min_score: float = 0.0
    """The gate's absolute bar: every variant's ``accuracy`` must reach it (0: no bar)."""
    control: float | None = None
    """Detectors: the baseline's mAP@0.5 with each image's detections paired with another image's labels (the
    negative control: it must be far below the bar, or the test set could not tell right from wrong)."""

    def variant(self, name: str) -> VariantEvaluation:
        """The evaluation of variant ``name``."""
        for item in self.variants:
            if item.name == name:
                return item
        raise KeyError(name)

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        """Read what :meth:`save` wrote."""
        raw = json.loads(Path(path).read_text())
        raw["variants"] = [VariantEvaluation(**v) for v in raw["variants"]]
        return cls(**raw)


def _session(path: Path):  # noqa: ANN202 - onnxruntime has no stubs
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure_latency_ms(session, sample: np.ndarray, batch: int, *, runs: int, warmup: int = 10) -> float:  # noqa: ANN001
    """Median wall-clock milliseconds of one ``session.run`` on a batch of ``batch`` copies of ``sample``."""
    x = np.repeat(sample[None], batch, axis=0)
    return time_calls(lambda: session.run(None, {INPUT_NAME: x}), runs=runs, warmup=warmup).p50_ms


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> list[list[int]]:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix.tolist()


def evaluate_variants(
    onnx_dir: str | Path,
    infos: list[VariantInfo],
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    tolerance_points: float = 1.0,
    min_speedup: float = 1.0,
    latency_runs: int = 100,
    calibration: dict | None = None,
    min_score: float = 0.0,
) -> Evaluation:
    """Accuracy, size, CPU latency (batch 1 and 16) and speed-ups of each variant, and the gate.

    The gate fails when an INT8 variant loses more than ``tolerance_points`` accuracy points (0..100 scale)
    against the FP32 baseline, or when a variant's accuracy is below ``min_score`` (0..1; 0: no bar).
    ``min_speedup`` does not fail the run: it decides which CPU variants are preferred (see the module docstring).
    """
    onnx_dir = Path(onnx_dir)
    names = [i.name for i in infos]
    if BASELINE not in names:
        raise ConfigError(f"the baseline variant {BASELINE!r} is missing (have {names})")
    results: list[VariantEvaluation] = []
    for info in infos:
        session = _session(onnx_dir / info.file)
        predicted = _outputs(session, x_test).argmax(axis=1)
        results.append(_evaluation(info, onnx_dir, session, x_test, latency_runs,
                                   accuracy=float((predicted == y_test).mean()),
                                   confusion=confusion_matrix(y_test, predicted, num_classes)))
    rank_by_speed(results, min_speedup)
    failures = gate_failures(results, tolerance_points, min_score, "accuracy")
    return Evaluation(BASELINE, tolerance_points, results, passed=not failures, failures=failures,
                      min_speedup=min_speedup, calibration=calibration or {}, min_score=min_score)


def _outputs(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """The model's first output on every sample of ``x``, run 256 at a time."""
    return np.concatenate([session.run(None, {INPUT_NAME: x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def _evaluation(info: VariantInfo, onnx_dir: Path, session: ort.InferenceSession, x_test: np.ndarray,
                latency_runs: int, *, accuracy: float, confusion: list[list[int]] | None = None,
                map50_95: float | None = None) -> VariantEvaluation:
    """A variant's evaluation: what the export recorded, its file size, its score (``accuracy``: top-1 or mAP@0.5,
    with a classifier's ``confusion`` or a detector's ``map50_95``), and its CPU latency at batch 1 and 16."""
    return VariantEvaluation(
        name=info.name, precision=info.precision, quantization=info.quantization, pruned=info.pruned,
        params=info.params, flops=info.flops, size_bytes=(onnx_dir / info.file).stat().st_size, accuracy=accuracy,
        latency_ms_b1=measure_latency_ms(session, x_test[0], 1, runs=latency_runs),
        latency_ms_b16=measure_latency_ms(session, x_test[0], 16, runs=max(10, latency_runs // 4)),
        confusion=confusion or [], map50_95=map50_95,
    )


def gate_failures(results: list[VariantEvaluation], tolerance_points: float, min_score: float,
                  figure: str) -> list[str]:
    """Fill in each variant's drop against the baseline (points, 0..100 scale) and say, one line each, which
    INT8 variant loses more than ``tolerance_points`` of ``figure`` (``accuracy``, ``mAP@0.5``) and which variant
    stays below ``min_score``."""
    baseline = next(r for r in results if r.name == BASELINE)
    failures = []
    for result in results:
        result.drop_points = round((baseline.accuracy - result.accuracy) * 100.0, 4)
        if result.precision == "int8" and result.drop_points > tolerance_points:
            failures.append(
                f"{result.name} loses {result.drop_points:.2f} {figure} points against {BASELINE} "
                f"(tolerance {tolerance_points:.2f})"
            )
    failures += [f"{r.name} reaches {figure} {r.accuracy:.4f}, below the bar of {min_score:.4f}"
                 for r in results if r.accuracy < min_score]
    return failures


def evaluate_detector_variants(
    onnx_dir: str | Path,
    infos: list[VariantInfo],
    x_test: np.ndarray,
    boxes_test: np.ndarray,
    *,
    tolerance_points: float = 1.0,
    min_score: float = 0.0,
    min_speedup: float = 1.0,
    latency_runs: int = 100,
    calibration: dict | None = None,
) -> Evaluation:
    """COCO mAP@0.5 and mAP@0.5:0.95 (against the box tables ``boxes_test``, after the task's decode and NMS),
    size, CPU latency (batch 1 and 16) and speed-ups of each detector variant, and the gate.

    Each variant's ``accuracy`` is its mAP@0.5. The gate fails when an INT8 variant loses more than
    ``tolerance_points`` mAP@0.5 points (0..100 scale) against the FP32 baseline, or a variant's mAP@0.5 is below
    ``min_score``. The negative control (the baseline's detections against shuffled labels) is recorded for the
    manifest.
    """
    from components.detector import control_map50, detection_scores

    onnx_dir = Path(onnx_dir)
    names = [i.name for i in infos]
    if BASELINE not in names:
        raise ConfigError(f"the baseline variant {BASELINE!r} is missing (have {names})")
    size = int(x_test.shape[-1])
    results: list[VariantEvaluation] = []
    control = None
    for info in infos:
        session = _session(onnx_dir / info.file)
        outputs = _outputs(session, x_test)
        map50, map50_95 = detection_scores(outputs, boxes_test, size)
        if info.name == BASELINE:
            control = control_map50(outputs, boxes_test, size)
        results.append(_evaluation(info, onnx_dir, session, x_test, latency_runs, accuracy=map50,
                                   map50_95=map50_95))
    rank_by_speed(results, min_speedup)
    failures = gate_failures(results, tolerance_points, min_score, "mAP@0.5")
    return Evaluation(BASELINE, tolerance_points, results, passed=not failures, failures=failures,
                      min_speedup=min_speedup, calibration=calibration or {}, metric="detection_map50",
                      min_score=min_score, control=control)


def rank_by_speed(results: list[VariantEvaluation], min_speedup: float) -> None:
    """Fill in each variant's speed-ups against ``fp32-dense`` and ``fp32``, and mark CPU INT8 variants whose
    speed-up over ``fp32`` is below ``min_speedup`` at batch 1 or 16 as not preferred, saying why."""
    if min_speedup <= 0:
        raise ConfigError(f"min_speedup must be positive, got {min_speedup}")
    by_name = {r.name: r for r in results}
    for result in results:
        for ref_name in (BASELINE, PRUNED):
            ref = by_name.get(ref_name)
            if ref is None:
                continue
            result.speedup[f"b1_vs_{ref_name}"] = round(ref.latency_ms_b1 / max(result.latency_ms_b1, 1e-9), 3)
            result.speedup[f"b16_vs_{ref_name}"] = round(ref.latency_ms_b16 / max(result.latency_ms_b16, 1e-9), 3)
    reference = PRUNED if PRUNED in by_name else BASELINE
    for result in results:
        if result.quantization not in CPU_QUANTIZATIONS:
            continue
        b1, b16 = result.speedup[f"b1_vs_{reference}"], result.speedup[f"b16_vs_{reference}"]
        if min(b1, b16) < min_speedup:
            result.preferred = False
            result.note = (f"not preferred: {b1:.2f}x at batch 1 and {b16:.2f}x at batch 16 against {reference} "
                           f"on this CPU, below the required {min_speedup:.2f}x; devices serve {reference} unless "
                           f"told otherwise")


def enforce_gate(evaluation: Evaluation) -> None:
    """Raise :class:`GateFailed` (one line, every failure) when the gate did not pass."""
    if not evaluation.passed:
        raise GateFailed("quality gate failed: " + "; ".join(evaluation.failures))
