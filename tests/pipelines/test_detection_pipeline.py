"""The retraining pipeline trains a detector: the synthetic detection set through every step (train, prune, QAT,
export, gate on mAP, report, publish) in kfp.local against the real SeaweedFS S3, then an edge runtime serves the
published version after validating it by COCO mAP@0.5 on the device."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.export import run_onnx
from edgeloop_core.contract import ArtifactLayout
from edgeloop_core.published import verify_published
from pipelines.local_run import run_local

pytestmark = pytest.mark.integration

MODEL = "shapes-detector"
BAR = 0.8
"""The stated mAP@0.5 the FP32 detector must reach on the synthetic test set (it reaches about 0.98)."""
SETTINGS = {"data_uri": "synthetic-detection", "arch": "detector", "epochs": 8, "prune_keep_fraction": 0.75,
            "prune_finetune_epochs": 3, "qat_epochs": 1, "min_score": BAR}
"""Short schedules sized for two CPU cores; the gate is the default one (INT8 within 1 mAP@0.5 point of FP32)
plus the absolute bar."""


@pytest.fixture(scope="module")
def detection_run(local_s3, key_dir, tmp_path_factory):
    """One pipeline run of the detector, published to its own bucket."""
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    store = local_s3.store("detection-pipeline")
    try:
        result = run_local({"model_name": MODEL, "bucket": store.bucket, "s3_endpoint": local_s3.endpoint_url,
                            **SETTINGS}, runs_dir=tmp_path_factory.mktemp("runs"))
    finally:
        mp.undo()
    return store, result


def test_the_detector_reaches_the_bar_and_int8_stays_within_a_point(detection_run):
    _, result = detection_run
    evaluation = result.evaluation()
    assert evaluation.metric == "detection_map50" and evaluation.passed
    dense, pruned = evaluation.variant("fp32-dense"), evaluation.variant("fp32")
    assert dense.accuracy >= BAR and pruned.accuracy >= BAR
    for name in ("int8-qdq", "int8-ort"):
        int8 = evaluation.variant(name)
        assert dense.accuracy - int8.accuracy <= 0.01, name  # within 1 mAP@0.5 point of FP32
        assert int8.map50_95 is not None and 0.5 < int8.map50_95 < int8.accuracy, name
    assert pruned.flops <= 0.75 * dense.flops
    assert evaluation.control is not None and evaluation.control < 0.05  # shuffled labels: the set can judge


def test_the_published_version_is_a_yolov8_detector_validated_by_map(detection_run, verify_key, tmp_path):
    store, result = detection_run
    layout = ArtifactLayout()
    manifest = verify_published(store, layout, MODEL, result.version, verify_key, workdir=tmp_path)
    task = manifest.task
    assert (task.kind, task.layout, task.num_classes, task.score_threshold) == ("detection", "yolov8", 4, 0.05)
    assert {(s.name, s.output, s.axis, s.start, s.stop) for s in task.slices} == {
        ("boxes", "detections", 1, 0, 4), ("scores", "detections", 1, 4, None)}
    assert [(o.name, o.shape) for o in manifest.outputs] == [("detections", [-1, 8, 64])]
    assert manifest.inputs[0].shape == [-1, 1, 64, 64]
    assert manifest.labels == ["ellipse", "rectangle", "triangle", "cross"]
    evaluation = result.evaluation()
    validation = manifest.validation
    assert validation.metric == "detection_map50" and validation.tolerance == pytest.approx(0.01)
    assert validation.reference == {v.name: v.accuracy for v in evaluation.variants}
    assert validation.control == pytest.approx(evaluation.control)
    with np.load(tmp_path / "validation.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["coco", "inputs"] and npz["coco"].shape == ()
        coco, inputs = json.loads(str(npz["coco"])), npz["inputs"]
    assert len(coco["images"]) == len(inputs) == validation.num_samples
    assert [c["id"] for c in coco["categories"]] == [0, 1, 2, 3]
    assert min(a["id"] for a in coco["annotations"]) == 1
    for name in ("int8-qdq", "int8-ort"):  # the decode stayed in floating point: scores keep their resolution
        scores = run_onnx(tmp_path / f"{name}.onnx", inputs[:100])[:, 4:]
        assert len(np.unique(scores)) > 100, name  # one UINT8 scale over boxes and scores leaves about 5 values
    report = store.get_bytes(layout.file_key(MODEL, manifest.version, "report.html")).decode()
    assert "<th>mAP@0.5 %</th><th>mAP@0.5:0.95 %</th>" in report and report.count("data:image/png;base64,") == 3
    for variant in evaluation.variants:
        assert f"<td>{variant.accuracy * 100:.2f}</td><td>{variant.map50_95 * 100:.2f}</td>" in report


def test_an_edge_runtime_validates_the_detector_by_map_and_serves_it(detection_run, edge_settings, tmp_path):
    import tritonclient.grpc as triton

    from edgeloop_core.detection import decode, detection_map
    from tests.edge_runtime.conftest import RunningEdge

    store, result = detection_run
    manifest = result.manifest
    # measure every variant this CPU runs: each must pass the on-device mAP@0.5 validation to be a candidate
    edge = RunningEdge(edge_settings(store.bucket, models=[{"name": MODEL}], variant_choice_budget_s=0.2))
    try:
        edge.wait_ready(timeout=120)
        validated = edge.events("validated")
        assert {e["variant"] for e in validated} == {"int8-ort", "fp32", "fp32-dense"}
        for event in validated:
            assert event["metric"] == "detection_map50" and event["passed"], event
            assert event["value"] >= manifest.validation.reference[event["variant"]] - 0.01
        status = edge.app.repository.runtime(MODEL).status()
        assert status["serving_version"] == manifest.version and "detection_map50" in status["validation"]

        # a client gets the YOLOv8 layout and decodes it as the manifest's task says
        validation = store.download_file(ArtifactLayout().file_key(MODEL, manifest.version, "validation.npz"),
                                         tmp_path / "validation.npz")
        with np.load(validation, allow_pickle=False) as npz:
            x, coco = npz["inputs"], json.loads(str(npz["coco"]))
        client = triton.InferenceServerClient(edge.address)
        outputs = []
        for start in range(0, len(x), 32):
            given = triton.InferInput("input", [len(x[start : start + 32]), 1, 64, 64], "FP32")
            given.set_data_from_numpy(x[start : start + 32])
            outputs.append(client.infer(MODEL, [given]).as_numpy("detections"))
        served = np.concatenate(outputs)
        assert served.shape == (len(x), 8, 64)
        map50, _ = detection_map(decode({"detections": served}, manifest.task), coco)
        assert map50 >= manifest.validation.reference[status["variant"]] - 0.01
    finally:
        edge.stop()

