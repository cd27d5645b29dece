"""KFP v2 components: thin wrappers that turn artifacts into paths, call one plain function, and log metrics.

Each runs in ``COMPONENT_IMAGE`` on a cluster (built from ``dockerfiles/cloud.Dockerfile``, which installs this
project), and in this Python environment under ``kfp.local``'s SubprocessRunner. Imports live inside the
functions because KFP ships each function's source on its own.
"""

# No `from __future__ import annotations` here: KFP reads the real annotations of each component.
import os

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

COMPONENT_IMAGE = os.environ.get("EDGELOOP_COMPONENT_IMAGE", "ghcr.io/edgeloop/edgeloop-cloud:0.1.0")
"""The one place that names the image every step runs in (override with ``EDGELOOP_COMPONENT_IMAGE``)."""

component = dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)


@component
def load_data(data_uri: str, seed: int, image_size: int, channels: int, dataset: Output[Dataset]) -> None:
    """Load ``data_uri`` (``digits``, a folder or ``s3://`` prefix) and split it deterministically."""
    from components.data import load_dataset

    splits = load_dataset(data_uri, seed=seed, image_size=image_size, channels=channels)
    splits.save(dataset.path)
    dataset.metadata.update({
        "source": splits.source, "fingerprint": splits.fingerprint(), "classes": splits.num_classes,
        "train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test),
    })


@component
def field_data(
    dataset: Input[Dataset], model_name: str, bucket: str, prefix: str, s3_endpoint: str, channel: str,
    deployed_channel: str, field_snapshot: str, field_since: str, field_ratio: float, field_slice_fraction: float,
    teacher: str, teacher_min_confidence: float, seed: int, field_dataset: Output[Dataset],
) -> None:
    """Mix field data into the training split and hold out the field slice (``field_snapshot``: ``""`` copies the
    dataset unchanged; ``latest`` builds a snapshot of the model's captures now; else a snapshot's digest). The
    lineage (snapshot, label sources, devices, days, ids) lands in the dataset's ``extra["field"]``."""
    from components.field_data import prepare_field_data

    lineage = prepare_field_data(
        dataset.path, field_dataset.path, model_name=model_name, bucket=bucket, prefix=prefix,
        s3_endpoint=s3_endpoint, snapshot=field_snapshot, since=field_since, ratio=field_ratio,
        slice_fraction=field_slice_fraction, teacher=teacher, teacher_min_confidence=teacher_min_confidence,
        seed=seed, deployed_channel=deployed_channel or channel,
    )
    if lineage:
        train, held = lineage.get("train", {}), lineage.get("slice", {})
        print(f"field data: snapshot {lineage.get('snapshot', '')[:12]}…, {train.get('rows_in_train', 0)} rows "
              f"mixed into training from {train.get('samples', 0)} samples, field slice {held.get('samples', 0)} "
              f"samples from {', '.join(held.get('devices', [])) or 'no device'}")
        if lineage.get("note"):
            print(f"field data: {lineage['note']}")
    field_dataset.metadata.update({"field": bool(lineage), "snapshot": lineage.get("snapshot", "") if lineage else ""})


@component
def plan(
    dataset: Input[Dataset], model_name: str, bucket: str, prefix: str, channel: str, s3_endpoint: str,
    arch: str, epochs: int, lr: float, seed: int, prune_constraint: str, prune_keep_fraction: float,
    prune_finetune_epochs: int, qat_epochs: int, tolerance_points: float, calibration_samples: int,
    min_speedup: float, force_retrain: bool, plan_info: Output[Artifact], base_dataset: Input[Dataset] = None,
    deployed_channel: str = "", warm_start: bool = False, retrain_min_new_labels: int = 50,
    retrain_min_new_share: float = 0.0, retrain_drift_threshold: float = 0.0, hub_address: str = "",
) -> str:
    """``train``, or ``skip`` when the deployed version was trained on the same data and config (unless forced), or
    when field data brings too little that is new (components/plan.py: the rules); prints the reason.

    ``dataset`` is what trains (field items mixed in), ``base_dataset`` the curated data before them. ``plan_info``
    (JSON: decision, reason, fingerprints, config) goes to publish; the decision is the single ``Output`` because
    ``dsl.If`` under ``kfp.local`` resolves only that name.
    """
    from components.plan import FieldTriggers, TrainingConfig, decide

    config = TrainingConfig(arch=arch, epochs=epochs, lr=lr, seed=seed, prune_constraint=prune_constraint,
                            prune_keep_fraction=prune_keep_fraction, prune_finetune_epochs=prune_finetune_epochs,
                            qat_epochs=qat_epochs, tolerance_points=tolerance_points,
                            calibration_samples=calibration_samples, min_speedup=min_speedup, warm_start=warm_start)
    triggers = FieldTriggers(min_new_labels=retrain_min_new_labels, min_new_share=retrain_min_new_share,
                             drift_threshold=retrain_drift_threshold, hub_address=hub_address)
    result = decide(dataset.path, config, model_name=model_name, bucket=bucket, prefix=prefix, channel=channel,
                    s3_endpoint=s3_endpoint, force_retrain=force_retrain,
                    base_dataset_path=base_dataset.path if base_dataset is not None else None,
                    deployed_channel=deployed_channel, triggers=triggers)
    result.save(plan_info.path)
    print(f"plan: {result.decision}: {result.reason}")
    plan_info.metadata.update({"decision": result.decision, "fingerprint": result.fingerprint,
                               "reason": result.reason})
    return result.decision


@component
def train(dataset: Input[Dataset], arch: str, epochs: int, lr: float, seed: int, model: Output[Model],
          metrics: Output[Metrics], warm_start: bool = False, model_name: str = "", bucket: str = "",
          prefix: str = "", s3_endpoint: str = "", channel: str = "", deployed_channel: str = "") -> None:
    """Train the FP32 baseline (a detector's figure is mAP@0.5 where a classifier's is accuracy); with
    ``warm_start``, from the deployed version's verified training checkpoint (``deployed_channel``, empty:
    ``channel``) instead of from scratch."""
    import json
    import tempfile
    from pathlib import Path

    from components.data import DatasetSplits
    from components.models import count_flops, count_params, save_checkpoint
    from components.publish import WARM_START_FILE
    from components.train import accuracy, fetch_warm_start, train_model

    data = DatasetSplits.load(dataset.path)
    figure = "map50" if data.task == "detection" else "accuracy"
    base = None
    if warm_start:
        with tempfile.TemporaryDirectory(prefix="edgeloop-warm-") as tmp:
            base = fetch_warm_start(model_name=model_name, bucket=bucket, prefix=prefix, s3_endpoint=s3_endpoint,
                                    channel=deployed_channel or channel, workdir=tmp)
        print(f"warm start from {model_name}/{base.version} (checkpoint sha256 {base.checkpoint_sha256[:12]}…)")
    net, spec, history = train_model(data, arch=arch, epochs=epochs, lr=lr, seed=seed, warm_start=base)
    save_checkpoint(net, spec, model.path)
    if base is not None:
        (Path(model.path) / WARM_START_FILE).write_text(json.dumps(base.lineage()))
        model.metadata["warm_start"] = base.version
    for row in history.epochs:
        metrics.log_metric(f"val_{figure}_epoch_{int(row['epoch']):02d}", row[history.metric])
    metrics.log_metric(f"val_{figure}", history.final_val_score)
    metrics.log_metric(f"test_{figure}", accuracy(net, data.x_test, data.y_test))
    metrics.log_metric("params", count_params(net))
    metrics.log_metric("flops", count_flops(net, data.input_shape))
    model.metadata.update({"arch": arch, "framework": "pytorch"})


@component
def prune(dataset: Input[Dataset], model: Input[Model], constraint: str, keep_fraction: float,
          finetune_epochs: int, seed: int, pruned_model: Output[Model], metrics: Output[Metrics]) -> None:
    """Structured pruning (Model Optimizer FastNAS) to ``keep_fraction`` of the FLOPs or params, then fine-tune."""
    from components.data import DatasetSplits
    from components.models import load_checkpoint, save_checkpoint
    from components.prune import prune_model
    from components.train import accuracy

    data = DatasetSplits.load(dataset.path)
    net, spec = load_checkpoint(model.path)
    net, result = prune_model(net, data, constraint=constraint, keep_fraction=keep_fraction,
                              finetune_epochs=finetune_epochs, seed=seed)
    save_checkpoint(net, spec, pruned_model.path)
    metrics.log_metric("flops_before", result.flops_before)
    metrics.log_metric("flops_after", result.flops_after)
    metrics.log_metric("flops_reduction", result.flops_reduction)
    metrics.log_metric("params_after", result.params_after)
    metrics.log_metric("test_map50" if data.task == "detection" else "test_accuracy",
                       accuracy(net, data.x_test, data.y_test))


@component
def qat(dataset: Input[Dataset], model: Input[Model], epochs: int, seed: int, calibration_samples: int,
        qat_model: Output[Model], metrics: Output[Metrics]) -> None:
    """INT8 quantization-aware training (Model Optimizer): calibrate, then fine-tune."""
    from components.data import DatasetSplits
    from components.models import load_checkpoint, save_checkpoint
    from components.qat import quantize_aware_train
    from components.train import accuracy

    data = DatasetSplits.load(dataset.path)
    net, spec = load_checkpoint(model.path)
    net, history = quantize_aware_train(net, data, epochs=epochs, seed=seed, calibration_samples=calibration_samples)
    save_checkpoint(net, spec, qat_model.path)
    figure = "map50" if data.task == "detection" else "accuracy"
    metrics.log_metric(f"val_{figure}", history.final_val_score)
    metrics.log_metric(f"test_{figure}", accuracy(net, data.x_test, data.y_test))


@component
def export(dataset: Input[Dataset], dense_model: Input[Model], pruned_model: Input[Model],
           qat_model: Input[Model], calibration_samples: int, seed: int, onnx_models: Output[Model]) -> None:
    """Export FP32 (dense and pruned), FP16, INT8 Q/DQ (TensorRT) and INT8 ORT (CPU) ONNX, checked against PyTorch.

    ONNX Runtime's quantizer calibrates on the same stratified sample as QAT (same size, same seed; for detection
    data, whose images hold several classes, a seeded random one). A detector's variants are checked by its task,
    and its in-graph decode stays in floating point in both INT8 variants."""
    from components.data import DatasetSplits, calibration_indices, class_histogram
    from components.detection_export import export_detector_variants
    from components.export import check_inputs, export_variants, save_calibration_info
    from components.models import load_checkpoint

    data = DatasetSplits.load(dataset.path)
    dense, _ = load_checkpoint(dense_model.path)
    pruned, _ = load_checkpoint(pruned_model.path)
    quantized, _ = load_checkpoint(qat_model.path)
    rows = calibration_indices(data.y_train, calibration_samples, seed=seed)
    detection = data.task == "detection"
    exporter = export_detector_variants if detection else export_variants
    x_check = data.x_test if detection else check_inputs(data.x_test, data.x_val, data.x_train)
    infos = exporter(dense, pruned, quantized, x_check=x_check, x_calibration=data.x_train[rows],
                     out_dir=onnx_models.path)
    save_calibration_info(onnx_models.path, samples=len(rows), seed=seed,
                          histogram=class_histogram(data.y_train[rows], data.labels))
    onnx_models.metadata.update({"variants": [i.name for i in infos], "format": "onnx"})


@component
def evaluate(dataset: Input[Dataset], onnx_models: Input[Model], tolerance_points: float, min_speedup: float,
             evaluation: Output[Artifact], metrics: Output[Metrics], min_score: float = 0.0, model_name: str = "",
             bucket: str = "", prefix: str = "", s3_endpoint: str = "", channel: str = "", deployed_channel: str = "",
             field_gate: str = "beat", field_tolerance_points: float = 0.0) -> None:
    """Accuracy (detectors: COCO mAP@0.5 and mAP@0.5:0.95), size, ORT CPU latency and speed-ups of every variant;
    the INT8 gate and ``min_score``; CPU INT8 variants below ``min_speedup`` marked not preferred; for classifiers,
    the two-slice comparison with the version deployed on ``deployed_channel`` (empty: ``channel``) in ``bucket``:
    curated test set and field slice, ``field_gate`` ``beat``/``match``/``off``. Records the verdict and never fails
    on it: the ``gate`` step does, after the report is written."""
    from components.data import DatasetSplits
    from components.evaluate import evaluate_run
    from edgeloop_core.contract import ArtifactLayout
    from edgeloop_core.store import ObjectStore

    data = DatasetSplits.load(dataset.path)
    store = ObjectStore(bucket, endpoint_url=s3_endpoint or None) if bucket else None
    result = evaluate_run(data, onnx_models.path, tolerance_points=tolerance_points, min_speedup=min_speedup,
                          min_score=min_score, store=store, layout=ArtifactLayout(prefix), model_name=model_name,
                          channel=deployed_channel or channel, field_gate=field_gate,
                          field_tolerance_points=field_tolerance_points)
    result.save(evaluation.path)
    for v in result.variants:
        if v.map50_95 is None:
            metrics.log_metric(f"{v.name}_accuracy", v.accuracy)
        else:
            metrics.log_metric(f"{v.name}_map50", v.accuracy)
            metrics.log_metric(f"{v.name}_map50_95", v.map50_95)
        metrics.log_metric(f"{v.name}_size_bytes", v.size_bytes)
        metrics.log_metric(f"{v.name}_latency_ms_b1", v.latency_ms_b1)
        metrics.log_metric(f"{v.name}_latency_ms_b16", v.latency_ms_b16)
        for figure, value in v.speedup.items():
            metrics.log_metric(f"{v.name}_speedup_{figure}", value)
    evaluation.metadata.update({"passed": result.passed, "failures": result.failures, "deployed": result.deployed,
                                "not_preferred": {v.name: v.note for v in result.variants if not v.preferred}})


@component
def report(dataset: Input[Dataset], evaluation: Input[Artifact], model_name: str, report_html: Output[HTML],
           metrics: Output[Metrics], confusion: Output[ClassificationMetrics]) -> None:
    """HTML report with plots, KFP metrics, and the confusion matrix of the TensorRT INT8 variant (detectors:
    mAP@0.5 and mAP@0.5:0.95 per variant, no confusion matrix). Written whether the gate passed or not: it shows
    the curated test set and the field slice side by side with the deployed version, and every failure."""
    from components.data import DatasetSplits
    from components.evaluate import Evaluation
    from components.report import comparison_metrics, write_report

    data = DatasetSplits.load(dataset.path)
    result = Evaluation.load(evaluation.path)
    write_report(result, data.labels, report_html.path, title=f"edgeloop: {model_name}",
                 details={"data": data.source, "test samples": str(len(data.y_test))}, extra=data.extra)
    for name, value in comparison_metrics(result).items():
        metrics.log_metric(name, value)
    for v in result.variants:
        if v.map50_95 is None:
            metrics.log_metric(f"{v.name}_accuracy", v.accuracy)
        else:
            metrics.log_metric(f"{v.name}_map50", v.accuracy)
            metrics.log_metric(f"{v.name}_map50_95", v.map50_95)
        metrics.log_metric(f"{v.name}_drop_points", v.drop_points)
    if data.task != "detection":
        confusion.log_confusion_matrix(data.labels, result.variant("int8-qdq").confusion)


@component
def gate(evaluation: Input[Artifact]) -> None:
    """Fail the run, after the report is written and before anything is published, when the evaluation's gate did
    not pass: one :class:`~edgeloop_core.errors.GateFailed` line, the first failure (the report lists them all)."""
    from components.evaluate import Evaluation, enforce_gate

    enforce_gate(Evaluation.load(evaluation.path))


@component
def publish(dataset: Input[Dataset], onnx_models: Input[Model], evaluation: Input[Artifact],
            report_html: Input[HTML], model_name: str, bucket: str, prefix: str, channel: str, s3_endpoint: str,
            tolerance_points: float, plan_info: Input[Artifact], manifest: Output[Artifact],
            dense_model: Input[Model] = None) -> str:
    """Publish a new immutable version (files, signed manifest, channel pointer); returns the version. With
    ``dense_model`` (the train step's FP32 model) the version keeps its training checkpoint (cloud-only, for warm
    starts) and the manifest's ``training`` records it with the field lineage, warm start and plan."""
    from components.publish import publish_from_paths

    return publish_from_paths(
        dataset_path=dataset.path, onnx_dir=onnx_models.path, evaluation_path=evaluation.path,
        report_path=report_html.path, model_name=model_name, bucket=bucket, prefix=prefix, channel=channel,
        s3_endpoint=s3_endpoint, tolerance_points=tolerance_points, plan_path=plan_info.path,
        manifest_out=manifest.path, manifest_meta=manifest.metadata,
        dense_model_dir=dense_model.path if dense_model is not None else None,
    )


@component
def resign_channels(model_name: str, bucket: str, prefix: str, s3_endpoint: str) -> str:
    """Re-sign the model's channel pointers that expire within a third of their TTL (same version, higher sequence),
    with the publish step's key; the pipeline runs it when the plan skips training. Returns what it re-signed."""
    from components.publish import resign_from_env

    pointers = resign_from_env(model_name=model_name, bucket=bucket, prefix=prefix, s3_endpoint=s3_endpoint)
    for p in pointers:
        print(f"re-signed channel {p.channel!r} of {model_name!r}: {p.version}, sequence {p.sequence}, "
              f"expires {p.expires.isoformat()}")
    return ",".join(p.channel for p in pointers)


@component
def import_onnx(onnx_uri: str, calibration_uri: str, holdout_fraction: float, calibration_layout: str,
                calibration_scale: float, calibration_mean: str, calibration_std: str, calibration_samples: int,
                onnx_models: Output[Model], holdout: Output[Dataset], task: str = "", layout: str = "",
                slices: str = "", nms: bool = False, max_detections: int = 100, score_threshold: float = 0.25,
                iou_threshold: float = 0.45, labels_uri: str = "") -> None:
    """Bring your own ONNX: the intake normalises it (fp32), then FP16, INT8 Q/DQ (Model Optimizer) and INT8 (ONNX
    Runtime) variants. Calibration: an .npz (one array per input) or a folder of images (local or s3://). ``task``
    and ``layout`` (empty: inferred) say what the outputs mean; the step fails at once when they do not fit. A
    detector's thresholds go into its task; ``nms`` appends decode and NMS to every variant after quantization
    (:func:`components.nms.append_nms`)."""
    import json
    import tempfile
    from pathlib import Path

    from components.data import local_folder
    from components.import_onnx import (
        build_variants,
        fetch_model,
        fetch_uri,
        held_out_labels,
        read_calibration,
        run_all,
        save_holdout,
        split_calibration,
    )
    from components.intake import ImagePreprocessing, read_image_calibration
    from components.tasks import check_stated
    from edgeloop_core.errors import ConfigError

    check_stated(task, layout, slices)
    with tempfile.TemporaryDirectory() as tmp:
        source = fetch_model(onnx_uri, Path(tmp) / "model.onnx")
        labels = None
        if labels_uri and not calibration_uri.endswith(".npz"):
            raise ConfigError("--labels needs an .npz calibration set whose rows are the labels' images, in order")
        if calibration_uri.endswith(".npz"):
            calibration, held = read_calibration(fetch_uri(calibration_uri, Path(tmp) / "calibration.npz"),
                                                 holdout_fraction)
            if labels_uri:
                count = len(next(iter(calibration.values()))) + len(next(iter(held.values())))
                try:
                    coco = json.loads(fetch_uri(labels_uri, Path(tmp) / "labels.json").read_text())
                except ValueError as exc:
                    raise ConfigError(f"{labels_uri} is not JSON: give COCO-format labels") from exc
                labels = held_out_labels(coco, count, holdout_fraction, labels_uri)
        else:
            prep = ImagePreprocessing.parse(calibration_layout, calibration_scale, calibration_mean, calibration_std)
            with local_folder(calibration_uri) as folder:
                arrays = read_image_calibration(folder, source, prep, limit=calibration_samples)
            calibration, held = split_calibration(arrays, holdout_fraction, calibration_uri)
            Path(onnx_models.path).mkdir(parents=True, exist_ok=True)
            (Path(onnx_models.path) / "preprocessing.json").write_text(json.dumps(
                {"kind": "image", "layout": prep.layout, "scale": prep.scale, "mean": list(prep.mean),
                 "std": list(prep.std)}))
        build_variants(source, calibration, Path(onnx_models.path), task=task, layout=layout, slices=slices,
                       nms=nms, max_detections=max_detections, score_threshold=score_threshold,
                       iou_threshold=iou_threshold)
    save_holdout(Path(holdout.path), held, run_all(Path(onnx_models.path) / "fp32.onnx", held), labels)
    onnx_models.metadata.update({"source": onnx_uri, "format": "onnx"})


@component
def evaluate_agreement(onnx_models: Input[Model], holdout: Input[Dataset], min_agreement: float,
                       metrics: Output[Metrics]) -> None:
    """Every variant against FP32 on the held-out inputs by the task's metric; a variant below ``min_agreement``
    is left out (the import fails when FP32 or every variant does). With the held-out images' COCO labels, each
    variant's mAP too."""
    import json
    from pathlib import Path

    import numpy as np

    from components.import_onnx import evaluate_agreement as measure

    with np.load(holdout.path) as npz:
        inputs = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("input:")}
        labels = json.loads(str(npz["coco"])) if "coco" in npz.files else None
    for variant in measure(Path(onnx_models.path), inputs, min_agreement, labels):
        metrics.log_metric(f"{variant.name}_agreement", variant.agreement)
        metrics.log_metric(f"{variant.name}_size_bytes", variant.size_bytes)
        metrics.log_metric(f"{variant.name}_latency_ms_b1", variant.latency_ms_b1)
        metrics.log_metric(f"{variant.name}_latency_ms_bmax", variant.latency_ms_bmax)
        if variant.map50 is not None:
            metrics.log_metric(f"{variant.name}_map50", variant.map50)
            metrics.log_metric(f"{variant.name}_map50_95", variant.map50_95 or 0.0)


@component
def publish_onnx(onnx_models: Input[Model], holdout: Input[Dataset], gate: Input[Metrics], model_name: str,
                 bucket: str, prefix: str, channel: str, s3_endpoint: str, tolerance: float,
                 manifest: Output[Artifact]) -> str:
    """Publish the imported model (after the agreement gate) as a new signed version."""
    from components.import_onnx import publish_imported

    return publish_imported(onnx_dir=onnx_models.path, holdout_path=holdout.path, model_name=model_name,
                            bucket=bucket, prefix=prefix, channel=channel, s3_endpoint=s3_endpoint,
                            tolerance=tolerance, manifest_out=manifest.path)


@component
def promote(model_name: str, bucket: str, prefix: str, s3_endpoint: str, hub_address: str, promote_from: str,
            promote_to: str, window_s: float, min_devices: int, drift_margin: float, accuracy_margin_points: float,
            min_feedback: int) -> str:
    """``edgeloop fleet promote`` as a step: move ``promote_to`` to ``promote_from``'s version when the canary
    devices' field signals allow (components.promote). Returns the version promoted, or "" when not (the reason is
    logged): a scheduled run must not fail because its canary is not ready, nor because the hub cannot be asked.
    Hub reader token from ``HUB_READ_TOKEN``, signing key from ``EDGELOOP_SIGNING_KEY[_FILE]``."""
    from components.promote import PromoteRules, promote_from_env
    from edgeloop_core.errors import EdgeloopError

    rules = PromoteRules(window_s=window_s, min_devices=min_devices, drift_margin=drift_margin,
                         accuracy_margin_points=accuracy_margin_points, min_feedback=min_feedback)
    try:
        result = promote_from_env(model_name=model_name, bucket=bucket, prefix=prefix, s3_endpoint=s3_endpoint,
                                  hub_address=hub_address, source=promote_from, target=promote_to, rules=rules)
    except EdgeloopError as exc:
        print(f"not promoted: {exc}")
        return ""
    print(result.line())
    return result.version if result.promoted else ""
