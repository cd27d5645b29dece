"""Evaluate every exported variant on the test set with ONNX Runtime (CPU) and apply the quality gate."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from components.export import INPUT_NAME, VariantInfo
from edge_runtime.errors import ConfigError, GateFailed

BASELINE = "fp32-dense"


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


@dataclass
class Evaluation:
    """All variants, the gate's verdict and why."""

    baseline: str
    tolerance_points: float
    variants: list[VariantEvaluation]
    passed: bool
    failures: list[str]

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
    for _ in range(warmup):
        session.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


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
    latency_runs: int = 100,
) -> Evaluation:
    """Accuracy, size and CPU latency (batch 1 and 16) of each variant, and the gate.

    The gate fails when an INT8 variant loses more than ``tolerance_points`` accuracy points (0..100 scale)
    against the FP32 baseline.
    """
    onnx_dir = Path(onnx_dir)
    names = [i.name for i in infos]
    if BASELINE not in names:
        raise ConfigError(f"the baseline variant {BASELINE!r} is missing (have {names})")
    results: list[VariantEvaluation] = []
    for info in infos:
        path = onnx_dir / info.file
        session = _session(path)
        logits = np.concatenate(
            [session.run(None, {INPUT_NAME: x_test[i : i + 256]})[0] for i in range(0, len(x_test), 256)]
        )
        predicted = logits.argmax(axis=1)
        results.append(
            VariantEvaluation(
                name=info.name,
                precision=info.precision,
                quantization=info.quantization,
                pruned=info.pruned,
                params=info.params,
                flops=info.flops,
                size_bytes=path.stat().st_size,
                accuracy=float((predicted == y_test).mean()),
                latency_ms_b1=measure_latency_ms(session, x_test[0], 1, runs=latency_runs),
                latency_ms_b16=measure_latency_ms(session, x_test[0], 16, runs=max(10, latency_runs // 4)),
                confusion=confusion_matrix(y_test, predicted, num_classes),
            )
        )
    baseline = next(r for r in results if r.name == BASELINE)
    failures = []
    for result in results:
        result.drop_points = round((baseline.accuracy - result.accuracy) * 100.0, 4)
        if result.precision == "int8" and result.drop_points > tolerance_points:
            failures.append(
                f"{result.name} loses {result.drop_points:.2f} accuracy points against {BASELINE} "
                f"(tolerance {tolerance_points:.2f})"
            )
    return Evaluation(BASELINE, tolerance_points, results, passed=not failures, failures=failures)


def enforce_gate(evaluation: Evaluation) -> None:
    """Raise :class:`GateFailed` (one line, every failure) when the gate did not pass."""
    if not evaluation.passed:
        raise GateFailed("quality gate failed: " + "; ".join(evaluation.failures))
