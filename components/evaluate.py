"""Evaluate every exported variant on the test set with ONNX Runtime (CPU) and apply the quality gate.

Each variant is judged by its task: classifiers by top-1 accuracy against the labels, detectors
(:func:`evaluate_detector_variants`) by COCO mAP@0.5 (and mAP@0.5:0.95) against the test set's boxes, decoded and
suppressed as the device does. Besides that score, size and latency, each variant gets its speed-up against
``fp32-dense`` and ``fp32`` (pruned) at batch 1 and 16. A CPU INT8 variant (``ort-qdq``) whose speed-up over
``fp32`` stays below ``min_speedup`` at either batch is published as not preferred, with the reason in the report:
devices then serve FP32 unless told otherwise (and each device measures again on itself before it chooses).

The two-slice gate (:func:`evaluate_run`, classifiers): when the channel already has a deployed version, each new
variant is set beside the deployed variant of the same name (else its ``fp32-dense``) on the curated test set and,
when the run has field data, on the held-out field slice (overall, per class, per device). The curated figure may not
drop more than ``tolerance_points`` below the deployed one; on the field slice the new variant must beat the deployed
one (``field_gate=beat``), stay within ``field_tolerance_points`` of it (``match``), or is not judged (``off``).
Nothing here raises on a verdict: the :class:`Evaluation` records it, the report shows it, and :func:`enforce_gate`
(the pipeline's ``gate`` step) fails the run with the first failure as one line.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.export import INPUT_NAME, VariantInfo
from edgeloop_core.errors import ConfigError, EdgeloopError, GateFailed
from edgeloop_core.timing import time_calls

if TYPE_CHECKING:
    import onnxruntime as ort

    from components.data import DatasetSplits
    from components.deployed import DeployedVersion
    from edgeloop_core.contract import ArtifactLayout
    from edgeloop_core.store import ObjectStore

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


FIELD_GATES = ("beat", "match", "off")
"""``field_gate`` values: the new version must beat the deployed one on the field slice, match it within
``field_tolerance_points``, or the field slice is not judged."""


@dataclass
class SliceAccuracy:
    """Top-1 accuracy (0..1) of one model on one slice: overall, and on the field slice per class label and per
    device (only the classes and devices the slice holds)."""

    overall: float
    per_class: dict[str, float] = field(default_factory=dict)
    per_device: dict[str, float] = field(default_factory=dict)


@dataclass
class VariantComparison:
    """One new variant beside the deployed variant it is judged against (``against``; empty when nothing deployed
    could be compared), on the curated test set and the field slice (``None``: that slice or side is absent)."""

    name: str
    against: str = ""
    curated: SliceAccuracy | None = None
    field: SliceAccuracy | None = None
    deployed_curated: SliceAccuracy | None = None
    deployed_field: SliceAccuracy | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> VariantComparison:
        """Read what ``asdict`` wrote."""
        slices = {k: SliceAccuracy(**raw[k]) if raw.get(k) is not None else None
                  for k in ("curated", "field", "deployed_curated", "deployed_field")}
        return cls(name=raw["name"], against=raw.get("against", ""), **slices)


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
    comparisons: list[VariantComparison] = field(default_factory=list)
    """Each variant beside the deployed version's (empty when there was nothing to compare with)."""
    deployed: dict[str, str] = field(default_factory=dict)
    """``channel`` and ``version`` of the deployed version compared with; empty when none was."""
    comparison_note: str = ""
    """Why there was no comparison, or what limited it (e.g. the first publish of a model)."""
    field_gate: str = "off"
    field_tolerance_points: float = 0.0
    field_slice: dict = field(default_factory=dict)
    """The field slice judged: ``samples``, ``class_counts`` and ``device_counts`` (empty: the run had no field
    data)."""
    better: list[str] = field(default_factory=list)
    """What got better against the deployed version (``fp32-dense``, the trained model itself), one item each."""
    worse: list[str] = field(default_factory=list)
    """What got worse, likewise."""
    lineage: dict = field(default_factory=dict)
    """Where the training data came from: the dataset's ``extra["field"]`` without the id lists (their counts
    instead), and the warm-start base when there was one."""

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
        raw["comparisons"] = [VariantComparison.from_dict(c) for c in raw.get("comparisons", [])]
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
    """Raise :class:`GateFailed` when the gate did not pass: one line, the first failure (and how many more the
    report lists)."""
    if evaluation.passed:
        return
    failures = evaluation.failures or ["the evaluation did not pass and recorded no reason"]
    more = len(failures) - 1
    raise GateFailed(failures[0] + (f" (and {more} more failure{'s' if more > 1 else ''}: see the report)"
                                    if more else ""))


# The two-slice gate: the new version beside the deployed one, on the curated test set and the field slice.


@dataclass
class FieldSlice:
    """The held-out field slice of a run: preprocessed inputs, labels, and the device each row came from."""

    x: np.ndarray
    y: np.ndarray
    devices: list[str]

    @classmethod
    def of(cls, data: DatasetSplits) -> FieldSlice | None:
        """``data``'s field slice (``x_field``/``y_field``, devices from ``extra["field"]["slice"]["device_of_row"]``;
        ``?`` where that list does not cover the rows); an empty slice when the run took field data but could hold
        none out; ``None`` when the run has no field data at all."""
        x, y = getattr(data, "x_field", None), getattr(data, "y_field", None)
        lineage = data.extra.get("field")
        if x is None or y is None or len(y) == 0:
            if not lineage:
                return None
            return cls(np.zeros((0, *data.input_shape), np.float32), np.zeros(0, np.int64), [])
        devices = [str(d) for d in (lineage or {}).get("slice", {}).get("device_of_row", [])]
        if len(devices) != len(y):
            devices = ["?"] * len(y)
        return cls(np.asarray(x, np.float32), np.asarray(y, np.int64), devices)

    @property
    def state(self) -> str:
        """``ready`` (rows to judge on) or ``empty``."""
        return "ready" if len(self.y) else "empty"


def slice_accuracy(predicted: np.ndarray, y: np.ndarray, labels: list[str],
                   devices: list[str] | None = None) -> SliceAccuracy:
    """Top-1 accuracy of ``predicted`` against ``y``: overall and, with ``devices`` (one per row), per class label
    and per device."""
    hits = predicted == y
    result = SliceAccuracy(overall=float(hits.mean()) if len(y) else 0.0)
    if devices is None:
        return result
    for cls in sorted(set(y.tolist())):
        result.per_class[labels[cls] if cls < len(labels) else str(cls)] = float(hits[y == cls].mean())
    rows = np.array(devices)
    for device in sorted(set(devices)):
        result.per_device[device] = float(hits[rows == device].mean())
    return result


def _predict(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 classes of the ONNX model at ``path`` on ``x`` (ONNX Runtime, CPU)."""
    return _outputs(_session(path), x).argmax(axis=1) if len(x) else np.zeros(0, np.int64)


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _deployed_side(version: str, comparison: VariantComparison, figure: float) -> str:
    """``deployed v… (74.0%)``, naming the deployed variant when it is not the new variant's namesake."""
    other = f" {comparison.against}" if comparison.against != comparison.name else ""
    return f"deployed {version}{other} ({_pct(figure)})"


def two_slice_failures(comparisons: list[VariantComparison], *, deployed_version: str, tolerance_points: float,
                       field_gate: str, field_tolerance_points: float, field_state: str) -> list[str]:
    """The two-slice gate's failures, one line each (pure; :func:`judge_two_slices` fills the figures).

    ``deployed_version`` is empty when nothing deployed could be compared (then only an empty field slice can
    fail). Curated: each variant ≥ its deployed counterpart − ``tolerance_points`` (0..100 points). Field slice, by
    ``field_gate``: ``beat`` strictly above, ``match`` ≥ deployed − ``field_tolerance_points``, ``off`` not
    judged. ``field_state`` is ``none`` (no field data: the field gate does not apply), ``empty`` (field data but
    no slice: the field gate cannot judge and fails unless ``off``) or ``ready``.
    """
    failures = []
    if field_gate != "off" and field_state == "empty":
        failures.append(f"field slice: empty (the labelled field data formed a single device/group, so none could be "
                        f"held out) — field_gate={field_gate} cannot judge the new version; capture labelled data on "
                        f"another device, or set field_gate=off")
    if not deployed_version:
        return failures
    for c in comparisons:
        if c.curated is not None and c.deployed_curated is not None:
            drop = round((c.deployed_curated.overall - c.curated.overall) * 100.0, 6)
            if drop > tolerance_points:
                failures.append(f"curated test: {c.name} {_pct(c.curated.overall)} is {drop:.2f} points below "
                                f"{_deployed_side(deployed_version, c, c.deployed_curated.overall)}, beyond "
                                f"tolerance_points {tolerance_points:.2f}")
    for c in comparisons:
        if field_gate == "off" or c.field is None or c.deployed_field is None:
            continue
        new, old = c.field.overall, c.deployed_field.overall
        drop = round((old - new) * 100.0, 6)
        if field_gate == "beat" and not drop < 0:
            failures.append(f"field slice: {c.name} {_pct(new)} is not above "
                            f"{_deployed_side(deployed_version, c, old)} — field_gate=beat")
        elif field_gate == "match" and drop > field_tolerance_points:
            failures.append(f"field slice: {c.name} {_pct(new)} is {drop:.2f} points below "
                            f"{_deployed_side(deployed_version, c, old)}, beyond field_tolerance_points "
                            f"{field_tolerance_points:.2f} — field_gate=match")
    return failures


def better_and_worse(comparison: VariantComparison) -> tuple[list[str], list[str]]:
    """What went up and what went down against the deployed counterpart: each slice overall, then each field
    class and device, largest change first; one item each, e.g. ``field slice +12.5 points (61.0% → 73.5%)``."""
    pairs: list[tuple[str, float, float]] = []
    for what, new, old in (("curated test", comparison.curated, comparison.deployed_curated),
                           ("field slice", comparison.field, comparison.deployed_field)):
        if new is not None and old is not None:
            pairs.append((what, new.overall, old.overall))
    detail: list[tuple[str, float, float]] = []
    if comparison.field is not None and comparison.deployed_field is not None:
        for kind, new_map, old_map in (("class", comparison.field.per_class, comparison.deployed_field.per_class),
                                       ("device", comparison.field.per_device,
                                        comparison.deployed_field.per_device)):
            detail += [(f"{kind} {key}", new_map[key], old_map[key]) for key in new_map if key in old_map]
    detail.sort(key=lambda item: -abs(item[1] - item[2]))
    better, worse = [], []
    for what, new, old in pairs + detail:
        delta = round((new - old) * 100.0, 6)
        line = f"{what} {delta:+.1f} points ({_pct(old)} → {_pct(new)})"
        if delta > 0:
            better.append(line)
        elif delta < 0:
            worse.append(line)
    return better, worse


def field_lineage(extra: dict) -> dict:
    """The dataset's field lineage for the report and manifest: ``extra["field"]`` with each id list replaced by its
    count (``ids_count``) and without the per-row devices; the warm-start base under ``warm_start`` when recorded."""
    lineage: dict = {}
    for key, value in (extra.get("field") or {}).items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in ("ids", "device_of_row")} | (
                {"ids_count": len(value["ids"])} if isinstance(value.get("ids"), list) else {})
        lineage[key] = value
    if extra.get("warm_start"):
        lineage["warm_start"] = extra["warm_start"]
    return lineage


def _compatible(deployed: DeployedVersion, data: DatasetSplits) -> str:
    """Why the deployed version cannot run on this run's slices (empty when it can)."""
    shape = list(deployed.manifest.inputs[0].shape[1:]) if deployed.manifest.inputs else []
    if shape != list(data.input_shape):
        return f"it takes inputs of shape {shape}, this run's data has {list(data.input_shape)}"
    if list(deployed.manifest.labels) != list(data.labels):
        return "its labels differ from this run's"
    return ""


def compare_variants(onnx_dir: Path, infos: list[VariantInfo], evaluation: Evaluation, data: DatasetSplits,
                     field_slice: FieldSlice | None, deployed: DeployedVersion | None) -> list[VariantComparison]:
    """Every new variant's accuracy on the curated test set (from ``evaluation``) and the field slice, beside its
    deployed counterpart's on both (each deployed variant run once, ONNX Runtime CPU)."""
    devices = field_slice.devices if field_slice is not None else None
    cache: dict[str, tuple[SliceAccuracy, SliceAccuracy | None]] = {}
    comparisons = []
    for info in infos:
        comparison = VariantComparison(name=info.name,
                                       curated=SliceAccuracy(evaluation.variant(info.name).accuracy))
        if field_slice is not None and field_slice.state == "ready":
            comparison.field = slice_accuracy(_predict(onnx_dir / info.file, field_slice.x), field_slice.y,
                                              data.labels, devices)
        if deployed is not None:
            counterpart = deployed.counterpart(info.name)
            if counterpart.name not in cache:
                path = deployed.path(counterpart)
                cache[counterpart.name] = (
                    slice_accuracy(_predict(path, data.x_test), data.y_test, data.labels),
                    slice_accuracy(_predict(path, field_slice.x), field_slice.y, data.labels, devices)
                    if comparison.field is not None and field_slice is not None else None)
            comparison.against = counterpart.name
            comparison.deployed_curated, comparison.deployed_field = cache[counterpart.name]
        comparisons.append(comparison)
    return comparisons


def judge_two_slices(evaluation: Evaluation, onnx_dir: str | Path, infos: list[VariantInfo], data: DatasetSplits, *,
                     deployed: DeployedVersion | None, channel: str, field_gate: str = "beat",
                     field_tolerance_points: float = 0.0, problem: str = "") -> Evaluation:
    """Add the two-slice comparison and its verdict to ``evaluation`` (in place; returned too).

    ``deployed`` is the verified version now on ``channel`` (``None``: first publish, or ``problem`` says why it
    could not be read, which fails the gate; an empty ``channel``: no comparison was asked for). The field slice
    comes from ``data`` (:meth:`FieldSlice.of`).
    """
    if field_gate not in FIELD_GATES:
        raise ConfigError(f"field_gate must be one of {', '.join(FIELD_GATES)}, got {field_gate!r}")
    field_slice = FieldSlice.of(data)
    evaluation.field_gate, evaluation.field_tolerance_points = field_gate, field_tolerance_points
    evaluation.lineage = field_lineage(data.extra)
    notes, failures = [], []
    if field_slice is None:
        notes.append("no field data in this run: the field gate does not apply")
    else:
        classes = sorted(set(field_slice.y.tolist()))
        evaluation.field_slice = {
            "samples": len(field_slice.y),
            "class_counts": {data.labels[c]: int((field_slice.y == c).sum()) for c in classes},
            "device_counts": {d: field_slice.devices.count(d) for d in sorted(set(field_slice.devices))}}
    if problem:
        failures.append(f"deployed version on channel {channel!r} could not be read: {problem}")
    elif deployed is None and not channel:
        notes.append("no bucket, model name or channel given: not compared with a deployed version")
    elif deployed is None:
        notes.append(f"no version deployed on channel {channel!r} (first publish): nothing to compare with")
    elif reason := _compatible(deployed, data):
        notes.append(f"deployed {deployed.version} cannot run on this run's slices: {reason}")
        if field_gate != "off" and field_slice is not None and field_slice.state == "ready":
            failures.append(f"field slice: cannot compare with deployed {deployed.version} ({reason}) — "
                            f"field_gate={field_gate}; set field_gate=off to publish without the field gate")
        deployed = None
    try:
        evaluation.comparisons = compare_variants(Path(onnx_dir), infos, evaluation, data, field_slice, deployed)
    except Exception as exc:  # ONNX Runtime's own errors: the deployed files are verified, yet may not run here
        if deployed is None:
            raise
        failures.append(f"deployed {deployed.version} could not run on this machine's ONNX Runtime: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        deployed = None
        evaluation.comparisons = compare_variants(Path(onnx_dir), infos, evaluation, data, field_slice, None)
    if deployed is not None:
        evaluation.deployed = {"channel": channel, "version": deployed.version}
    failures += two_slice_failures(
        evaluation.comparisons, deployed_version=deployed.version if deployed is not None else "",
        tolerance_points=evaluation.tolerance_points, field_gate=field_gate,
        field_tolerance_points=field_tolerance_points,
        field_state=field_slice.state if field_slice is not None else "none")
    reference = next((c for c in evaluation.comparisons if c.name == BASELINE), None)
    if reference is not None:
        evaluation.better, evaluation.worse = better_and_worse(reference)
    evaluation.comparison_note = "; ".join(notes)
    evaluation.failures += failures
    evaluation.passed = not evaluation.failures
    return evaluation


def evaluate_run(data: DatasetSplits, onnx_dir: str | Path, *, tolerance_points: float, min_speedup: float,
                 min_score: float = 0.0, store: ObjectStore | None = None, layout: ArtifactLayout | None = None,
                 model_name: str = "", channel: str = "", field_gate: str = "beat",
                 field_tolerance_points: float = 0.0, latency_runs: int = 100) -> Evaluation:
    """The evaluate step: every variant on the test set (:func:`evaluate_variants`, detectors
    :func:`evaluate_detector_variants`), then, for classifiers, the two-slice comparison with the version deployed
    on ``channel`` of ``model_name`` in ``store`` (none without a store, model name or channel). Never raises on a
    verdict: a deployed version that cannot be verified is a gate failure, recorded like the others."""
    from components.deployed import fetch_deployed
    from components.export import load_calibration_info, load_variant_infos
    from edgeloop_core.contract import ArtifactLayout

    infos, calibration = load_variant_infos(onnx_dir), load_calibration_info(onnx_dir)
    if data.task == "detection":
        result = evaluate_detector_variants(onnx_dir, infos, data.x_test, data.y_test,
                                            tolerance_points=tolerance_points, min_score=min_score,
                                            min_speedup=min_speedup, latency_runs=latency_runs,
                                            calibration=calibration)
        result.comparison_note = "the comparison with the deployed version covers classifiers only"
        return result
    result = evaluate_variants(onnx_dir, infos, data.x_test, data.y_test, data.num_classes,
                               tolerance_points=tolerance_points, min_speedup=min_speedup,
                               latency_runs=latency_runs, calibration=calibration, min_score=min_score)
    with tempfile.TemporaryDirectory(prefix="edgeloop-deployed-") as tmp:
        deployed, problem = None, ""
        if store is not None and model_name and channel:
            try:
                deployed = fetch_deployed(store, layout or ArtifactLayout(), model_name, channel, tmp)
            except EdgeloopError as exc:
                problem = str(exc)
        judge_two_slices(result, onnx_dir, infos, data, deployed=deployed,
                         channel=channel if store is not None and model_name else "", field_gate=field_gate,
                         field_tolerance_points=field_tolerance_points, problem=problem)
    return result
