"""Bring your own ONNX: a model trained elsewhere enters at the quantize step.

Post-training INT8 (Q/DQ for TensorRT with Model Optimizer's ONNX quantizer on the CPU, and ONNX Runtime's static
quantizer for CPUs), FP16, evaluation by output agreement with the FP32 model (no labels needed), and the same
publish and on-device validation as trained models. Every input and output, with its dynamic axes, passes through.

Output agreement: for each output, the cosine similarity between a variant's and the FP32 model's values, per
sample (flattened); the metric is the mean over samples and outputs (1.0 = identical direction).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.intake import tensor_specs
from components.tasks import infer_model_task, parse_slices, with_slices
from edgeloop_core.contract import FileRef, Manifest, Preprocessing, Task, Validation, Variant, sha256_file
from edgeloop_core.detection import decode, detection_map
from edgeloop_core.errors import ConfigError, GateFailed
from edgeloop_core.quality import (
    LABEL_FREE_CANDIDATES,
    check_informative,
    derangement,
    label_free_value,
    negative_control,
    tensor_agreement,
)

if TYPE_CHECKING:
    from edgeloop_core.drift import FieldBaseline

log = logging.getLogger(__name__)
VARIANTS = ("fp32", "fp16", "int8-qdq", "int8-ort")
TASK_FILE = "task.json"
GATE_FILE = "gate.json"
"""The gate's metric and negative control, for the manifest."""


def fetch_uri(uri: str, dest: Path) -> Path:
    """A local path, ``file://`` or ``s3://bucket/key`` (boto3's configuration) made local at ``dest``."""
    if uri.startswith("s3://"):
        from edgeloop_core.store import ObjectStore

        bucket, _, key = uri[len("s3://") :].partition("/")
        return ObjectStore(bucket).download_file(key, dest)
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ConfigError(f"{uri}: no such file")
    shutil.copyfile(path, dest)
    return dest


def fetch_model(uri: str, dest: Path) -> Path:
    """:func:`fetch_uri` for an ONNX model, with the external-data files its weights live in (models over 2 GB),
    fetched from beside it into ``dest``'s folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    fetch_uri(uri, dest)
    try:
        model = onnx.load(str(dest), load_external_data=False)
    except Exception as exc:
        from components.intake import ModelRefused

        raise ModelRefused(f"{uri} is not an ONNX model ({type(exc).__name__}): check the file") from exc
    locations = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    base = uri.rsplit("/", 1)[0]
    for location in sorted(locations):
        if location.startswith("/") or ".." in Path(location).parts:
            raise ConfigError(f"{uri}: external data {location!r} must sit beside the model")
        fetch_uri(f"{base}/{location}", dest.parent / location)
    return dest


def run_all(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of an ONNX model on ONNX Runtime's CPU provider, in batches the model accepts."""
    import onnxruntime as ort

    from components.intake import batches, model_batch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    fixed = model_batch(path)
    parts = [session.run(names, part) for part in batches(inputs, fixed or 256, fixed=fixed is not None)]
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


@dataclass
class ImportedVariant:
    """One variant of the imported model and its agreement with FP32 on the held-out inputs."""

    name: str
    file: str
    precision: str
    quantization: str
    backends: list[str]
    agreement: float = 1.0
    """The gate's metric (``metric``) of this variant against FP32 on the held-out inputs."""
    size_bytes: int = 0
    latency_ms_b1: float = 0.0
    latency_ms_bmax: float = 0.0
    """ONNX Runtime CPU latency at the largest batch the model allows (its fixed batch, or 16)."""
    batch_max: int = 1
    metric: str = "tensor_agreement"
    detail: str = ""
    """The worst output or slice, where the metric compares several."""
    map50: float | None = None
    """A detector's COCO mAP@0.5 on the held-out images, where the import was given their labels."""
    map50_95: float | None = None


def build_variants(source: Path, calibration: dict[str, np.ndarray], out_dir: Path, *, task: str = "",
                   layout: str = "", slices: str = "", nms: bool = False, max_detections: int = 100,
                   score_threshold: float = 0.25, iou_threshold: float = 0.45) -> list[ImportedVariant]:
    """The intake (:mod:`components.intake`: opset, batch axis, checks) makes ``fp32``; then FP16, INT8 Q/DQ (Model
    Optimizer, for TensorRT) and INT8 (ONNX Runtime, for CPUs), calibrated in batches the model accepts.

    A detector's decode/concat head, and the head of any model whose outputs declare slices (different quantities in
    one tensor), stays in floating point in both INT8 variants (:func:`~components.export.detector_head_nodes`): one
    INT8 scale over box coordinates and class scores rounds every score to 0.

    A detector's task records ``score_threshold`` and ``iou_threshold``. With ``nms`` (a YOLOv5/v8/v11-layout
    detector), decode and NMS are appended to every variant after quantization (:func:`components.nms.append_nms`,
    at most ``max_detections`` boxes per image), so INT8 never touches the NMS part and the served models answer
    ``boxes``, ``scores``, ``classes`` and ``num_detections`` (the task becomes the separate layout)."""
    from components.export import convert_fp16, quantize_modelopt_int8, quantize_ort_int8
    from components.intake import normalise
    from components.nms import LAYOUTS, append_nms

    out_dir.mkdir(parents=True, exist_ok=True)
    report = normalise(source, calibration, out_dir / "fp32.onnx")
    report.save(out_dir)
    stated = infer_model_task(out_dir / "fp32.onnx", calibration, task, layout)
    stated = with_slices(stated, parse_slices(slices), [o.name for o in tensor_specs(out_dir / "fp32.onnx")[1]])
    if stated.kind == "detection":
        stated = Task.model_validate({**stated.model_dump(), "score_threshold": score_threshold,
                                      "iou_threshold": iou_threshold})
    if nms and stated.layout not in LAYOUTS:  # said before minutes of quantization, not after
        raise ConfigError(f"nms needs a detector of layout {' or '.join(LAYOUTS)}; this model's outputs are "
                          f"{stated.kind}{f' ({stated.layout})' if stated.layout else ''}")
    (out_dir / TASK_FILE).write_text(stated.model_dump_json(indent=2))
    float_head = stated.kind == "detection" or bool(stated.slices)
    if report.fixed_batch is not None:  # whole batches only: the model accepts no other size
        usable = len(next(iter(calibration.values()))) // report.fixed_batch * report.fixed_batch
        calibration = {k: v[:usable] for k, v in calibration.items()}
    convert_fp16(out_dir / "fp32.onnx", out_dir / "fp16.onnx")
    quantize_ort_int8(out_dir / "fp32.onnx", out_dir / "int8-ort.onnx", calibration,
                      batch=report.fixed_batch or 32, float_head=float_head)
    quantize_modelopt_int8(out_dir / "fp32.onnx", out_dir / "int8-qdq.onnx", calibration, float_head=float_head)
    variants = [
        ImportedVariant("fp32", "fp32.onnx", "fp32", "none", ["tensorrt", "onnxruntime"]),
        ImportedVariant("fp16", "fp16.onnx", "fp16", "none", ["tensorrt", "onnxruntime"]),
        ImportedVariant("int8-qdq", "int8-qdq.onnx", "int8", "modelopt-qdq", ["tensorrt"]),
        ImportedVariant("int8-ort", "int8-ort.onnx", "int8", "ort-qdq", ["onnxruntime"]),
    ]
    if nms:  # after quantization: the quantizers never see the NMS part
        served = stated
        for variant in variants:
            served = append_nms(out_dir / variant.file, out_dir / variant.file, stated,
                                max_detections=max_detections)
        (out_dir / TASK_FILE).write_text(served.model_dump_json(indent=2))
    (out_dir / "variants.json").write_text(json.dumps([asdict(v) for v in variants]))
    return variants


def read_task(out_dir: Path) -> Task:
    """The task :func:`build_variants` recorded (a classifier's when there is none: an older import folder)."""
    path = Path(out_dir) / TASK_FILE
    return Task.model_validate_json(path.read_text()) if path.exists() else Task()


def choose_metric(task: Task, reference: dict[str, np.ndarray], threshold: float) -> tuple[str, float]:
    """``(metric, negative control)``: the first label-free metric for ``task`` whose negative control (outputs
    paired with the wrong samples) stays clearly below ``threshold`` on this held-out set; :class:`GateFailed` in
    one line when none can tell right from wrong here."""
    controls = []
    for metric in LABEL_FREE_CANDIDATES.get(task.kind, ("tensor_agreement",)):
        control = negative_control(metric, reference, task)
        if check_informative(metric, control, threshold) is None:
            return metric, control
        controls.append(f"{metric} {control:.4f}")
    raise GateFailed(f"the held-out set cannot judge this {task.kind} model: outputs paired with the wrong samples "
                     f"still score {', '.join(controls)} against a threshold of {threshold:.4f}; give labels, or more "
                     f"varied validation inputs")


def evaluate_agreement(out_dir: Path, holdout: dict[str, np.ndarray], min_agreement: float,
                       labels: dict[str, Any] | None = None) -> list[ImportedVariant]:
    """Each variant against FP32 on ``holdout`` by the task's label-free metric (:func:`choose_metric`).

    A variant below ``min_agreement`` fails the gate and is left out of the version (the reason, naming the output or
    slice that failed, e.g. a detector's class scores that INT8 erased, goes to ``gate.json``, the report and the
    log), so no device can choose it; :class:`GateFailed` when FP32 itself fails (a threshold above what the
    reference reaches) or nothing passes. Rewrites ``variants.json`` with the variants that passed and their
    figures.

    With COCO ``labels`` for the held-out images (a detector), every variant also gets its mAP@0.5 and
    mAP@0.5:0.95 against them, and the device validates by ``detection_map50`` against those labels (the negative
    control: FP32's detections scored against other images' labels)."""
    from components.intake import model_batch

    variants = [ImportedVariant(**v) for v in json.loads((out_dir / "variants.json").read_text())]
    reference = run_all(out_dir / "fp32.onnx", holdout)
    task = read_task(out_dir)
    metric, control = choose_metric(task, reference, min_agreement)
    fixed = model_batch(out_dir / "fp32.onnx")
    for variant in variants:
        got = run_all(out_dir / variant.file, holdout)
        variant.metric, variant.agreement = metric, label_free_value(metric, reference, got, task)
        variant.detail = _worst_part(metric, reference, got, task)
        if labels is not None and task.kind == "detection":
            variant.map50, variant.map50_95 = detection_map(decode(got, task), labels)
        variant.size_bytes = (out_dir / variant.file).stat().st_size
        variant.batch_max = fixed or 16
        variant.latency_ms_b1, variant.latency_ms_bmax = _latencies(out_dir / variant.file, holdout, fixed)
    failing = {v.name: f"{v.name} {v.metric} {v.agreement:.4f} < {min_agreement:.4f}"
               + (f" ({v.detail})" if v.detail else "") for v in variants if v.agreement < min_agreement}
    passed = [v for v in variants if v.name not in failing]
    if "fp32" in failing or not passed:
        raise GateFailed("quality gate failed: " + "; ".join(failing.values()))
    for reason in failing.values():
        log.warning("left out of the version: %s", reason)
    device_metric, device_control = metric, control
    if labels is not None and task.kind == "detection":  # the device judges against the labels
        order = derangement(len(labels["images"]))
        shuffled = {**labels, "images": [labels["images"][i] for i in order]}
        device_metric, device_control = "detection_map50", detection_map(decode(reference, task), shuffled)[0]
    (out_dir / GATE_FILE).write_text(json.dumps({"metric": device_metric, "control": device_control,
                                                 "gate_metric": metric, "gate_control": control,
                                                 "threshold": min_agreement,
                                                 "excluded": [{**asdict(v), "reason": failing[v.name]}
                                                              for v in variants if v.name in failing]}))
    (out_dir / "variants.json").write_text(json.dumps([asdict(v) for v in passed]))
    return passed


def _worst_part(metric: str, reference: dict[str, np.ndarray], got: dict[str, np.ndarray], task: Task) -> str:
    """The worst output or slice with its score, for ``tensor_agreement``; for the other metrics only a part that
    collapsed (e.g. ``output0[scores] 0.0000 collapsed: all zeros`` beside a detection F1 of 0), else ``""``."""
    worst = tensor_agreement(reference, got, task.slices).worst()
    if worst is None or (metric != "tensor_agreement" and not worst.collapsed):
        return ""
    return f"{worst.part} {worst.score:.4f} {worst.reason}".rstrip()


LATENCY_BUDGET_S = 2.0
"""Seconds each of the report's latency figures may take per variant (at least 3 timed runs): a large detector at
batch 16 would otherwise spend most of an import timing itself."""


def _latencies(path: Path, inputs: dict[str, np.ndarray], fixed: int | None) -> tuple[float, float]:
    """ONNX Runtime CPU p50 at batch 1 (or the fixed batch) and at the largest batch the model allows, each within
    :data:`LATENCY_BUDGET_S`."""
    import onnxruntime as ort

    from edgeloop_core.timing import repeat_batch, time_calls

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    one = repeat_batch({k: v[:1] for k, v in inputs.items()}, fixed or 1)
    many = repeat_batch({k: v[:1] for k, v in inputs.items()}, fixed or 16)
    return (time_calls(lambda: session.run(None, one), runs=50, warmup=5, budget_s=LATENCY_BUDGET_S).p50_ms,
            time_calls(lambda: session.run(None, many), runs=20, warmup=1, budget_s=LATENCY_BUDGET_S).p50_ms)


def write_import_report(path: Path, name: str, variants: list[ImportedVariant], intake: dict[str, Any],
                        gate: dict[str, Any] | None = None) -> Path:
    """The imported model's report: what the intake changed; size, the gate's task metric against FP32 and latency
    per variant; the negative control; and the variants the gate left out, with why."""
    import html

    fp32 = next((v for v in variants if v.name == "fp32"), variants[0])
    rows = "".join(
        f"<tr><td>{html.escape(v.name)}</td><td>{v.precision}</td><td>{v.size_bytes / 1024:.1f}</td>"
        f"<td>{html.escape(v.metric)} {v.agreement:.4f}{html.escape(' (' + v.detail + ')' if v.detail else '')}</td>"
        f"<td>{v.latency_ms_b1:.3f}</td><td>{v.latency_ms_bmax:.3f} (b{v.batch_max})</td>"
        f"<td>{fp32.latency_ms_bmax / max(v.latency_ms_bmax, 1e-9):.2f}x</td></tr>" for v in variants)
    changes = "".join(f"<li>{html.escape(c)}</li>" for c in intake.get("changes", [])) or "<li>nothing</li>"
    gate = gate or {}
    gate_metric = gate.get("gate_metric", gate.get("metric"))
    judged = (f"<p>Gate: {html.escape(str(gate_metric))} against FP32 on the held-out inputs, at least "
              f"{gate.get('threshold', 0.0):.4f}; the same metric on wrongly paired samples (the negative control): "
              f"{gate.get('gate_control', gate.get('control', 0.0)):.4f}.</p>" if gate_metric else "")
    labelled = [v for v in variants if v.map50 is not None]
    if labelled:
        rows_map = "".join(f"<tr><td>{html.escape(v.name)}</td><td>{v.map50:.4f}</td><td>{v.map50_95:.4f}</td></tr>"
                           for v in labelled)
        judged += (f"<h2>Against the held-out labels</h2><table border='1'><tr><th>variant</th><th>mAP@0.5</th>"
                   f"<th>mAP@0.5:0.95</th></tr>{rows_map}</table><p>The device validates by mAP@0.5 against these "
                   f"labels (negative control: {gate.get('control', 0.0):.4f}).</p>")
    left_out = "".join(f"<li>{html.escape(e['reason'])}</li>" for e in gate.get("excluded", []))
    judged += f"<h2>Left out by the gate</h2><ul>{left_out}</ul>" if left_out else ""
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(name)}</title></head>"
            f"<body><h1>edgeloop import: {html.escape(name)}</h1><h2>Intake</h2><ul>{changes}</ul>"
            f"<p>opset {intake.get('opset_before')} → {intake.get('opset_after')}; batch "
            f"{intake.get('fixed_batch') or 'dynamic'}</p><h2>Variants</h2><table border='1'><tr><th>variant</th>"
            f"<th>precision</th><th>size KiB</th><th>task metric against fp32</th><th>ORT ms b1</th>"
            f"<th>ORT ms, largest batch</th><th>÷ fp32</th></tr>{rows}</table><p>Latency: ONNX Runtime on the CPU "
            f"that ran the pipeline; the TensorRT variants' speed is measured on each device.</p>{judged}"
            "</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


def import_manifest(name: str, version: str, staging: Path, variants: list[ImportedVariant],
                    tolerance: float, samples: int, intake: dict[str, Any] | None = None,
                    preprocessing: Preprocessing | None = None, task: Task | None = None,
                    gate: dict[str, Any] | None = None) -> Manifest:
    """The unsigned manifest of an imported model: its task, and validation by the gate's label-free metric
    (``gate``: ``metric`` and negative ``control``) against the FP32 outputs in ``validation.npz``."""
    gate = gate or {"metric": variants[0].metric if variants else "tensor_agreement", "control": None}
    inputs, outputs = tensor_specs(staging / "fp32.onnx")

    def ref(file: str) -> dict[str, Any]:
        digest, size = sha256_file(staging / file)
        return {"file": file, "sha256": digest, "size_bytes": size}

    return Manifest(
        name=name, version=version, created_at=datetime.now(timezone.utc),
        pipeline_run={"pipeline": "edgeloop-import-onnx"},
        inputs=inputs, outputs=outputs, task=task or Task(),
        preprocessing=preprocessing or Preprocessing(kind="none", layout="as exported"),
        training={"intake": intake or {}},
        variants=[Variant(**ref(v.file), name=v.name, precision=v.precision, quantization=v.quantization,
                          backends=v.backends, accuracy=v.agreement) for v in variants],  # type: ignore[arg-type]
        validation=Validation(**ref("validation.npz"), metric=gate["metric"], num_samples=samples,
                              reference={v.name: (v.map50 if gate["metric"] == "detection_map50" and v.map50 is not
                                                  None else v.agreement) for v in variants}, tolerance=tolerance,
                              control=gate.get("control")),
        report=FileRef(**ref("report.html")) if (staging / "report.html").exists() else None,
        field_baseline=holdout_baseline(staging / "validation.npz", task or Task()),
    )


def holdout_baseline(path: Path, task: Task) -> FieldBaseline | None:
    """The field statistics (:mod:`edgeloop_core.drift`) of the held-out rows and the FP32 model's outputs on them,
    as the drift baseline; ``None`` where the held-out inputs have nothing numeric to summarise."""
    from edgeloop_core.drift import build_baseline

    with np.load(path) as npz:
        inputs = {k.removeprefix("input:"): npz[k] for k in npz.files if k.startswith("input:")}
        outputs = {k.removeprefix("reference:"): npz[k] for k in npz.files if k.startswith("reference:")}
    try:
        return build_baseline(inputs, outputs, task, num_classes=task.num_classes)
    except ValueError:
        return None


def save_holdout(path: Path, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                 labels: dict[str, Any] | None = None) -> None:
    """validation.npz: ``input:<name>`` and ``reference:<output>`` (FP32's outputs) arrays, and ``coco`` (COCO
    labels of the held-out images, JSON text) where the import was given them."""
    arrays = {f"input:{k}": v for k, v in inputs.items()} | {f"reference:{k}": v for k, v in reference.items()}
    if labels is not None:
        arrays["coco"] = np.array(json.dumps(labels))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def held_out_labels(labels: dict[str, Any], count: int, holdout_fraction: float, where: str) -> dict[str, Any]:
    """The COCO labels of the rows :func:`split_calibration` holds out: ``labels["images"]`` lists the calibration
    rows' images in row order (image ``i`` is row ``i``); a :class:`ConfigError` in one line when it does not."""
    from components.data import calibration_indices

    images = labels.get("images") if isinstance(labels, dict) else None
    if not isinstance(images, list) or len(images) != count or not isinstance(labels.get("annotations"), list):
        raise ConfigError(f"{where}: COCO labels with one image per calibration row ({count}) and an annotations "
                          f"list are needed; got {len(images) if isinstance(images, list) else 'no'} images")
    cut = max(1, int(round(count * (1.0 - holdout_fraction))))
    held = [images[i] for i in np.sort(calibration_indices(None, count, total=count)[cut:])]
    ids = {image["id"] for image in held}
    return {**labels, "images": held, "annotations": [a for a in labels["annotations"] if a["image_id"] in ids]}


def read_calibration(path: Path, holdout_fraction: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An .npz whose arrays are named after the model's inputs → (calibration, held-out) rows.

    The rows are split at random (seeded), not first/last: calibration files are often written in the order the
    data was collected (one class, one scene after another), and both parts must represent all of it.
    """
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return split_calibration(arrays, holdout_fraction, str(path))


def split_calibration(arrays: dict[str, np.ndarray], holdout_fraction: float,
                      where: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(calibration, held-out) rows of ``arrays``, split at random (seeded)."""
    from components.data import calibration_indices

    path = where
    if not arrays:
        raise ConfigError(f"{path}: the calibration set has no arrays")
    count = len(next(iter(arrays.values())))
    cut = max(1, int(round(count * (1.0 - holdout_fraction))))
    if cut >= count:
        raise ConfigError(f"{path}: {count} samples leave nothing to hold out")
    order = calibration_indices(None, count, total=count)
    calibration, held = np.sort(order[:cut]), np.sort(order[cut:])
    return {k: v[calibration] for k, v in arrays.items()}, {k: v[held] for k, v in arrays.items()}


def publish_imported(*, onnx_dir: str, holdout_path: str, model_name: str, bucket: str, prefix: str, channel: str,
                     s3_endpoint: str, tolerance: float, manifest_out: str) -> str:
    """Publish an imported model's variants and its output-agreement validation set; returns the version."""
    from components.publish import new_version, publish_version
    from edgeloop_core.contract import ArtifactLayout, load_signing_key
    from edgeloop_core.store import ObjectStore

    variants = [ImportedVariant(**v) for v in json.loads((Path(onnx_dir) / "variants.json").read_text())]
    version = new_version()
    with tempfile.TemporaryDirectory(prefix="edgeloop-import-") as tmp:
        staging = Path(tmp)
        for v in variants:
            shutil.copyfile(Path(onnx_dir) / v.file, staging / v.file)
        shutil.copyfile(holdout_path, staging / "validation.npz")
        with np.load(staging / "validation.npz") as npz:
            samples = len(npz[npz.files[0]])
        from components.intake import IntakeReport

        report = IntakeReport.load(Path(onnx_dir))
        intake = asdict(report) if report else {}
        gate_file = Path(onnx_dir) / GATE_FILE
        gate = json.loads(gate_file.read_text()) if gate_file.exists() else None
        write_import_report(staging / "report.html", model_name, variants, intake, gate)
        prep_file = Path(onnx_dir) / "preprocessing.json"
        preprocessing = Preprocessing.model_validate_json(prep_file.read_text()) if prep_file.exists() else None
        manifest = import_manifest(model_name, version, staging, variants, tolerance, samples, intake, preprocessing,
                                   read_task(Path(onnx_dir)), gate)
        signed = publish_version(ObjectStore(bucket, endpoint_url=s3_endpoint or None), manifest, staging,
                                 load_signing_key(), layout=ArtifactLayout(prefix), channel=channel or None)
    Path(manifest_out).write_text(signed.to_json())
    return version

