"""Detectors validated on the task, from the import to the device (issue 24).

* A YOLOv8-style detector (:mod:`tests.components.test_int8_heads`) imports through the pipeline with its head in
  floating point: its INT8 variants keep their detections (detection F1 against FP32 ≥ 0.95) and pass the gate.
* An INT8 file that erases the class scores (today's quantizer, head not excluded) is left out by the gate, and the
  report and the log say why — naming ``output0[scores]``.
* A version published the old way, gate bypassed, with that INT8 variant in it: the device's own validation fails it
  (naming the collapsed slice) and serves a variant that passed; the same for a collapse confined to any declared
  slice of a raw model.
* A server that answers with another sample's output, or the batch mean, fails the device's validation of the
  imported classifiers, where one cosine (the old metric) passed it; a held-out set that cannot tell right from
  wrong is refused at import in one line.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from components.import_onnx import (
    GATE_FILE,
    ImportedVariant,
    build_variants,
    evaluate_agreement,
    held_out_labels,
    import_manifest,
    read_task,
    run_all,
    save_holdout,
    split_calibration,
    write_import_report,
)
from edgeloop_core.contract import ArtifactLayout, Task
from edgeloop_core.errors import ConfigError
from edgeloop_core.quality import label_free_value, negative_control, output_agreement
from tests.components.test_int8_heads import INPUT, OUTPUT, build_yolo_style, float_head_violations, scenes

pytestmark = pytest.mark.integration

MIN_AGREEMENT = 0.95
BACKENDS = {"fp32": ["tensorrt", "onnxruntime"], "fp32-dense": ["tensorrt", "onnxruntime"],
            "fp16": ["tensorrt", "onnxruntime"], "int8-qdq": ["tensorrt"], "int8-ort": ["onnxruntime"]}
PRECISION = {"fp32": ("fp32", "none"), "fp32-dense": ("fp32", "none"), "fp16": ("fp16", "none"),
             "int8-qdq": ("int8", "modelopt-qdq"), "int8-ort": ("int8", "ort-qdq")}


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> dict:
    """The detector imported as the pipeline's first step does it (:func:`build_variants`, head in float), its
    calibration file and held-out rows, and an INT8 file made the old way (head quantized: every score 0)."""
    from components.export import quantize_ort_int8

    root = tmp_path_factory.mktemp("detector-gate")
    source = build_yolo_style(root / "detector.onnx")
    arrays = {INPUT: scenes(64, seed=1)}
    np.savez(root / "calibration.npz", **arrays)
    calibration, held = split_calibration(arrays, 0.25, "calibration.npz")
    build_variants(source, calibration, root / "imported")
    erasing = quantize_ort_int8(root / "imported" / "fp32.onnx", root / "int8-ort-erasing.onnx", calibration)
    return {"source": source, "calibration_file": root / "calibration.npz", "held": held, "dir": root / "imported",
            "erasing": erasing}


def test_an_imported_detectors_int8_keeps_its_detections_and_passes_the_gate(tmp_path, local_s3, key_dir, detector):
    from pipelines.import_onnx import import_onnx_pipeline
    from pipelines.local_run import run_local

    store = local_s3.store("detectors")
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    try:
        result = run_local({"onnx_uri": str(detector["source"]), "calibration_uri": str(detector["calibration_file"]),
                            "model_name": "yolo-style", "bucket": store.bucket, "s3_endpoint": local_s3.endpoint_url,
                            "min_agreement": MIN_AGREEMENT}, runs_dir=tmp_path / "runs", pipeline=import_onnx_pipeline)
    finally:
        mp.undo()
    manifest = result.manifest
    assert manifest is not None
    assert manifest.task.kind == "detection" and manifest.task.layout == "yolov8"  # inferred from [b, 6, 2100]
    assert manifest.validation.metric == "detection_f1"
    assert manifest.validation.control is not None and manifest.validation.control < MIN_AGREEMENT - 0.1
    figures = {v.name: v.accuracy for v in manifest.variants}
    print(f"detection F1 against FP32 on the held-out images: {figures}; negative control "
          f"{manifest.validation.control:.4f}")
    # int8-ort (this test's subject) and the float variants pass; int8-qdq passed too where this was written (0.955)
    assert {"fp32", "fp16", "int8-ort"} <= set(figures) and figures["int8-ort"] >= MIN_AGREEMENT
    assert all(figure >= MIN_AGREEMENT for figure in figures.values())
    (int8_ort,) = result.run_dir.glob("**/onnx_models/int8-ort.onnx")
    from components.export import detector_head_nodes

    assert float_head_violations(int8_ort, detector_head_nodes(int8_ort.parent / "fp32.onnx")) == []
    report = store.get_bytes(ArtifactLayout().file_key("yolo-style", manifest.version, "report.html")).decode()
    assert "detection_f1" in report and "int8-ort" in report


def test_the_gate_leaves_an_erasing_int8_out_and_says_why(tmp_path, detector, caplog):
    work = shutil.copytree(detector["dir"], tmp_path / "imported")
    shutil.copyfile(detector["erasing"], work / "int8-ort.onnx")  # what the quantizer made before the float head
    with caplog.at_level("WARNING", logger="components.import_onnx"):
        passed = evaluate_agreement(work, detector["held"], MIN_AGREEMENT)
    assert {v.name for v in passed} == {"fp32", "fp16", "int8-qdq"}
    gate = json.loads((work / GATE_FILE).read_text())
    assert gate["metric"] == "detection_f1" and [e["name"] for e in gate["excluded"]] == ["int8-ort"]
    reason = gate["excluded"][0]["reason"]
    assert reason.startswith(f"int8-ort detection_f1 0.0000 < {MIN_AGREEMENT:.4f}")
    assert f"{OUTPUT}[scores] 0.0000 collapsed: all zeros" in reason
    assert any(f"left out of the version: {reason}" in r.getMessage() for r in caplog.records)
    page = write_import_report(tmp_path / "report.html", "yolo-style", passed, {}, gate).read_text()
    assert "Left out by the gate" in page and html.escape(reason) in page
    # the version is made from what passed: no device can choose the erasing file
    save_holdout(work / "validation.npz", detector["held"], run_all(work / "fp32.onnx", detector["held"]))
    manifest = import_manifest("yolo-style", "v1", work, passed, 0.02, len(detector["held"][INPUT]), {}, None,
                               read_task(work), gate)
    assert "int8-ort" not in {v.name for v in manifest.variants}


def _publish_bypassing_the_gate(store, signing_key, staging: Path, name: str, task: Task, metric: str,
                                reference: dict[str, np.ndarray], held: dict[str, np.ndarray]) -> None:
    """Publish every ``*.onnx`` in ``staging`` as a version the way an old pipeline did — no variant left out —
    validated on the device by ``metric`` against the FP32 outputs, each variant's reference the FP32 figure."""
    from components.publish import publish_version

    save_holdout(staging / "validation.npz", held, reference)
    fp32_figure = label_free_value(metric, reference, reference, task)
    variants = [ImportedVariant(path.stem, path.name, *PRECISION[path.stem], BACKENDS[path.stem],
                                agreement=fp32_figure, metric=metric) for path in sorted(staging.glob("*.onnx"))]
    gate = {"metric": metric, "control": negative_control(metric, reference, task)}
    manifest = import_manifest(name, "v1", staging, variants, 0.05, len(next(iter(held.values()))), {}, None, task,
                               gate)
    publish_version(store, manifest, staging, signing_key, layout=ArtifactLayout(), channel="stable")


def _serve(edge_settings, store, name: str) -> tuple[str, dict[str, dict], dict]:
    """Run the real edge runtime, measuring and choosing among the variants; returns (served variant, the last
    ``validated`` event per variant, the ``variant_choice`` event)."""
    from tests.edge_runtime.conftest import RunningEdge

    edge = RunningEdge(edge_settings(store.bucket, model_name=name, variant_choice_budget_s=0.3), store=store)
    try:
        edge.wait_ready(120)
        served = edge.app.runtime.serving.plan.variant.name
        validated = {e["variant"]: e for e in edge.events("validated")}
        (choice,) = edge.events("variant_choice")
    finally:
        edge.stop()
    return served, validated, choice


@pytest.mark.parametrize("metric", ["tensor_agreement", "detection_f1"])
def test_the_device_fails_an_erasing_int8_and_serves_a_variant_that_passed(tmp_path, store, signing_key,
                                                                           edge_settings, detector, metric):
    staging = tmp_path / "stage"
    staging.mkdir()
    for name in ("fp32", "fp16", "int8-qdq"):
        shutil.copyfile(detector["dir"] / f"{name}.onnx", staging / f"{name}.onnx")
    shutil.copyfile(detector["erasing"], staging / "int8-ort.onnx")
    task = read_task(detector["dir"])
    reference = run_all(staging / "fp32.onnx", detector["held"])
    _publish_bypassing_the_gate(store, signing_key, staging, "yolo-style", task, metric, reference, detector["held"])

    served, validated, choice = _serve(edge_settings, store, "yolo-style")
    assert validated["int8-ort"]["metric"] == metric and not validated["int8-ort"]["passed"]
    assert validated["int8-ort"]["value"] == 0.0
    if metric == "tensor_agreement":  # the device names the slice that collapsed
        assert f"{OUTPUT}[scores] 0.0000 collapsed: all zeros" in validated["int8-ort"]["reason"]
    assert validated["fp32"]["passed"] and served == "fp32"
    assert choice["chosen"] == "fp32" and choice["mode"] == "measured"
    assert {f["variant"]: f["passed"] for f in choice["figures"]} == {"fp32": True, "int8-ort": False}


STATE_SLICES = {"position": (0, 3), "velocity": (3, 6), "confidence": (6, 9)}
"""A raw model's one output, ``state`` ``[batch, 9]``: positions (hundreds), velocities (~1), and confidences in
[0, 1] — three quantities in one tensor, declared as slices."""


def _raw_model(path: Path) -> Path:
    import torch
    from torch import nn

    class Tracker(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 9))

        def forward(self, signal: torch.Tensor) -> torch.Tensor:
            h = self.body(signal)
            return torch.cat([h[:, :3] * 100.0, h[:, 3:6], torch.sigmoid(h[:, 6:])], 1)

    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(Tracker().eval(), (torch.randn(2, 16),), str(path), input_names=["signal"],
                          output_names=["state"], dynamic_axes={"signal": {0: "batch"}, "state": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


def _collapse(source: Path, dest: Path, part: tuple[int, int], fill: np.ndarray) -> Path:
    """``source`` with the columns ``part`` of its output replaced by ``fill`` (zeros, or one constant per column):
    a variant whose collapse is confined to one slice."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    out = model.graph.output[0].name
    keep = np.ones((1, 9), np.float32)
    keep[0, part[0] : part[1]] = 0.0
    constant = np.zeros((1, 9), np.float32)
    constant[0, part[0] : part[1]] = fill
    for node in model.graph.node:
        node.output[:] = ["collapse/before" if o == out else o for o in node.output]
    model.graph.initializer.extend([numpy_helper.from_array(keep, "collapse/keep"),
                                    numpy_helper.from_array(constant, "collapse/constant")])
    model.graph.node.extend([helper.make_node("Mul", ["collapse/before", "collapse/keep"], ["collapse/kept"]),
                             helper.make_node("Add", ["collapse/kept", "collapse/constant"], [out])])
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return dest


@pytest.mark.parametrize(("collapsed", "how"), [("position", "zeros"), ("velocity", "constant"),
                                                ("confidence", "zeros")])
def test_a_collapse_confined_to_one_declared_slice_fails_on_the_device(tmp_path, store, signing_key, edge_settings,
                                                                        collapsed, how):
    from edgeloop_core.contract import OutputSlice
    from tests.edge_runtime.test_variant_choice import with_expensive_branch

    task = Task(kind="raw", slices=[OutputSlice(name=n, output="state", axis=1, start=a, stop=b)
                                    for n, (a, b) in STATE_SLICES.items()])
    staging = tmp_path / "stage"
    staging.mkdir()
    fast = _raw_model(tmp_path / "tracker.onnx")
    held = {"signal": np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)}
    reference = run_all(fast, held)
    start, stop = STATE_SLICES[collapsed]
    fill = reference["state"][:, start:stop].mean(axis=0) if how == "constant" else np.zeros(stop - start)
    # the good variant is the slow one (the same answers, several times the work): only validation keeps the fast,
    # broken one from serving
    with_expensive_branch(fast, staging / "fp32.onnx")
    _collapse(fast, staging / "int8-ort.onnx", (start, stop), fill)
    if collapsed != "position":  # one cosine over the whole output sees only the positions
        assert output_agreement(reference, run_all(staging / "int8-ort.onnx", held)) >= 0.99
    _publish_bypassing_the_gate(store, signing_key, staging, "tracker", task, "tensor_agreement", reference, held)

    served, validated, choice = _serve(edge_settings, store, "tracker")
    why = "collapsed: all zeros" if how == "zeros" else "collapsed: no variation across samples"
    assert not validated["int8-ort"]["passed"]
    assert f"worst part state[{collapsed}] 0.0000 {why}" in validated["int8-ort"]["reason"]
    assert validated["fp32"]["passed"] and served == "fp32" and choice["chosen"] == "fp32"


class _PreviousSample:
    """A server that answers every sample with the outputs of the sample before it (the first with the previous
    request's last): the real engine underneath, answers shifted by one."""

    def __init__(self, engine) -> None:
        self.engine, self.last = engine, None
        self.platform, self.inputs, self.outputs = engine.platform, engine.inputs, engine.outputs
        self.max_batch_size, self.memory_bytes = engine.max_batch_size, engine.memory_bytes

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answers = self.engine.infer(inputs)
        before = self.last or {k: v[-1:] for k, v in answers.items()}
        self.last = {k: v[-1:] for k, v in answers.items()}
        return {k: np.concatenate([before[k], v[:-1]]) for k, v in answers.items()}

    def close(self) -> None:
        self.engine.close()


class _BatchMean(_PreviousSample):
    """A server that answers every sample of a request with the request's mean output."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answers = self.engine.infer(inputs)
        return {k: np.repeat(v.mean(axis=0, keepdims=True), len(v), axis=0) for k, v in answers.items()}


@pytest.mark.parametrize("model_name", ["ResNetStyle", "MobileNetStyle"])
def test_a_server_answering_with_other_samples_outputs_fails_the_imported_classifiers(tmp_path, model_name):
    from components.import_onnx import choose_metric
    from components.intake import normalise
    from edge_runtime.build.engines.onnxruntime import OrtEngine
    from edge_runtime.validate import validate
    from tests.pipelines import test_import_real_models as zoo

    source = zoo.export_zoo_style(getattr(zoo, model_name)(), tmp_path / "zoo.onnx", ["logits/out:0"])
    normalise(source, {zoo.IMAGE: zoo._images()}, tmp_path / "fp32.onnx")  # as the import does: batch made dynamic
    held = {zoo.IMAGE: zoo._images(24, seed=3)}
    reference = run_all(tmp_path / "fp32.onnx", held)
    task = Task(kind="classification", num_classes=10)
    metric, control = choose_metric(task, reference, MIN_AGREEMENT)
    # the seeded models give every held-out input one class, so top-1 agreement cannot judge them (its negative
    # control is 1.0) and the import takes each output on its own, centred
    assert metric == "tensor_agreement" and control < MIN_AGREEMENT - 0.1
    staging = tmp_path
    save_holdout(staging / "validation.npz", held, reference)
    variant = ImportedVariant("fp32", "fp32.onnx", "fp32", "none", BACKENDS["fp32"], agreement=1.0, metric=metric)
    new = import_manifest("zoo", "v1", staging, [variant], 0.02, 24, {}, None, task, {"metric": metric,
                                                                                      "control": control})
    old = new.model_copy(update={"validation": new.validation.model_copy(update={"metric": "output_agreement"})})
    engine = OrtEngine(staging / "fp32.onnx", max_batch_size=8)
    try:
        assert validate(engine, staging / "validation.npz", new, "fp32", latency_runs=4).passed  # the honest server
        for liar in (_PreviousSample(engine), _BatchMean(engine)):
            judged_old = validate(liar, staging / "validation.npz", old, "fp32", latency_runs=4)
            judged = validate(liar, staging / "validation.npz", new, "fp32", latency_runs=4)
            print(f"{model_name} {type(liar).__name__}: one cosine {judged_old.value:.4f}, "
                  f"{metric} {judged.value:.4f} ({judged.reason})")
            assert judged_old.passed and judged_old.value >= 0.99  # what the device accepted until now
            assert not judged.passed and judged.value < 0.5
    finally:
        engine.close()


def test_a_held_out_set_that_cannot_tell_right_from_wrong_is_refused_at_import(tmp_path, local_s3, key_dir):
    from edgeloop_core.errors import PipelineFailed
    from pipelines.import_onnx import import_onnx_pipeline
    from pipelines.local_run import run_local
    from tests.pipelines import test_import_real_models as zoo

    source = zoo.export_zoo_style(zoo.ResNetStyle(), tmp_path / "zoo.onnx", ["logits/out:0"])
    one_image = zoo._images(1)
    np.savez(tmp_path / "calibration.npz", **{zoo.IMAGE: np.repeat(one_image, 24, axis=0)})  # every row the same
    local_s3.store("refused")
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    try:
        with pytest.raises(PipelineFailed) as info:
            run_local({"onnx_uri": str(source), "calibration_uri": str(tmp_path / "calibration.npz"),
                       "model_name": "zoo", "bucket": "refused", "s3_endpoint": local_s3.endpoint_url,
                       "min_agreement": MIN_AGREEMENT}, runs_dir=tmp_path / "runs", pipeline=import_onnx_pipeline)
    finally:
        mp.undo()
    message = str(info.value)
    print(message)
    assert "\n" not in message
    assert "GateFailed: the held-out set cannot judge this classification model" in message
    # both label-free metrics a classifier has (top-1 agreement, each output on its own) were tried
    assert message.endswith("outputs paired with the wrong samples still score top1_agreement 1.0000, "
                            "tensor_agreement 1.0000 against a threshold of 0.9500; give labels, or more varied "
                            "validation inputs")


def test_nms_appended_at_import_serves_boxes_and_passes_the_gate(tmp_path, detector):
    """``nms`` at import: decode + NonMaxSuppression appended to every variant after quantization, the task becomes
    the separate layout with the stated thresholds, and the gate judges the NMS outputs by detection F1."""
    import onnxruntime as ort

    out = tmp_path / "nms"
    build_variants(detector["source"], split_calibration({INPUT: scenes(64, seed=1)}, 0.25, "c")[0], out, nms=True,
                   max_detections=50, score_threshold=0.25, iou_threshold=0.5)
    task = read_task(out)
    assert (task.layout, task.score_threshold, task.iou_threshold) == ("separate", 0.25, 0.5)
    assert set(task.roles) == {"boxes", "scores", "classes", "num_detections"}
    session = ort.InferenceSession(str(out / "int8-ort.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "classes", "num_detections"]
    passed = evaluate_agreement(out, detector["held"], MIN_AGREEMENT)
    assert {"fp32", "fp16", "int8-ort"} <= {v.name for v in passed}
    assert all(v.metric == "detection_f1" and v.agreement >= MIN_AGREEMENT for v in passed)
    boxes = session.run(None, {INPUT: detector["held"][INPUT][:3]})
    assert boxes[0].shape == (3, 50, 4) and int(boxes[3].max()) > 0  # detections, padded to max_detections


def _coco_labels(detections: list, size: int) -> dict:
    """COCO-format labels from boxes (one image per row, 1-based ids), as a labelling tool exports them."""
    annotations = [{"id": n, "image_id": i + 1, "category_id": int(c), "iscrowd": 0,
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                    "area": float((b[2] - b[0]) * (b[3] - b[1]))}
                   for n, (i, b, c) in enumerate(((i, b, c) for i, found in enumerate(detections)
                                                  for b, c in zip(found.boxes, found.classes, strict=True)), 1)]
    classes = sorted({a["category_id"] for a in annotations})
    return {"images": [{"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size}
                       for i in range(len(detections))],
            "annotations": annotations, "categories": [{"id": c, "name": str(c)} for c in classes]}


def test_labels_given_at_import_give_each_variant_its_map_and_the_device_validates_by_them(
        tmp_path, local_s3, key_dir, edge_settings, detector):
    """``import-onnx --labels``: COCO labels of the calibration rows. The held-out rows' labels travel in
    validation.npz, every variant gets its mAP@0.5 and mAP@0.5:0.95 in the report, and the device validates by
    mAP@0.5 against them (the labels here are boxes drawn on the calibration scenes by the FP32 model, standing in
    for a labelling tool's export)."""
    from edgeloop_core.detection import decode
    from pipelines.import_onnx import import_onnx_pipeline
    from pipelines.local_run import run_local

    calibration = dict(np.load(detector["calibration_file"]))
    task = Task(kind="detection", layout="yolov8")
    (labels_file := tmp_path / "labels.json").write_text(json.dumps(_coco_labels(
        decode(run_all(detector["dir"] / "fp32.onnx", calibration), task), calibration[INPUT].shape[-1])))
    store = local_s3.store("labelled")
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    try:
        result = run_local({"onnx_uri": str(detector["source"]), "calibration_uri": str(detector["calibration_file"]),
                            "labels_uri": str(labels_file), "model_name": "labelled", "bucket": store.bucket,
                            "s3_endpoint": local_s3.endpoint_url, "min_agreement": MIN_AGREEMENT},
                           runs_dir=tmp_path / "runs", pipeline=import_onnx_pipeline)
    finally:
        mp.undo()
    manifest = result.manifest
    assert manifest is not None and manifest.validation.metric == "detection_map50"
    assert manifest.validation.reference["fp32"] == pytest.approx(1.0)  # its own boxes
    assert manifest.validation.control is not None and manifest.validation.control < 0.5
    report = store.get_bytes(ArtifactLayout().file_key("labelled", manifest.version, "report.html")).decode()
    assert "mAP@0.5:0.95" in report and "Against the held-out labels" in report
    served, validated, _ = _serve(edge_settings, store, "labelled")
    assert validated[served]["metric"] == "detection_map50" and validated[served]["passed"]
    with pytest.raises(ConfigError) as wrong:  # labels for another set of images
        held_out_labels({**_coco_labels([], 64), "images": []}, 64, 0.25, "labels.json")
    assert "one image per calibration row (64)" in str(wrong.value)
