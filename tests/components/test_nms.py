"""Decode + NMS appended to a detector's graph (components/nms.py): ONNX Runtime's answers equal
edgeloop_core.detection.decode of the raw model's, for the YOLOv8 and YOLOv5 layouts, at batch 1 and 3, with the
task's thresholds; the batch stays dynamic; INT8 variants get the NMS part after quantization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from components.nms import append_nms
from edgeloop_core.contract import Task
from edgeloop_core.detection import decode
from edgeloop_core.errors import ConfigError

CLASSES, ANCHORS = 5, 240


def raw_head(path: Path, layout: str, *, opset: int = 17, batch: str | int = "batch", anchors: int = ANCHORS,
             classes: int = CLASSES, elem_type: int = TensorProto.FLOAT) -> Path:
    """A graph whose one output is its input, laid out as ``layout`` (the values come from the test)."""
    shape = [batch, 4 + classes, anchors] if layout == "yolov8" else [batch, anchors, 5 + classes]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["output0"])], "head",
                              [helper.make_tensor_value_info("x", elem_type, shape)],
                              [helper.make_tensor_value_info("output0", elem_type, shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), str(path))
    return path


def raw_values(seed: int, batch: int, layout: str, anchors: int = ANCHORS, classes: int = CLASSES) -> np.ndarray:
    """Boxes in clusters of overlapping neighbours (so NMS has work), a few negative sizes, skewed scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 300, (batch, anchors, 2))
    centres[:, 1::2] = centres[:, ::2] + rng.normal(0, 5, (batch, anchors // 2, 2))
    sizes = rng.uniform(10, 80, (batch, anchors, 2)) * np.where(rng.random((batch, anchors, 1)) < 0.05, -1, 1)
    scores = rng.uniform(0, 1, (batch, anchors, classes)) ** 3
    if layout == "yolov8":
        return np.concatenate([centres, sizes, scores], 2).transpose(0, 2, 1).astype(np.float32)
    objectness = rng.uniform(0.2, 1, (batch, anchors, 1))
    return np.concatenate([centres, sizes, objectness, scores], 2).astype(np.float32)


def run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: x}),
                    strict=True))


def assert_equals_decode(got: dict[str, np.ndarray], raw: dict[str, np.ndarray], task: Task, max_det: int) -> None:
    """The appended outputs, row by row, against decode of the raw outputs: the first max_det detections (decode
    keeps them best first), zeros past num_detections."""
    expected = decode(raw, task)
    assert got["boxes"].shape == (len(expected), max_det, 4) and got["num_detections"].shape == (len(expected),)
    assert got["classes"].dtype == np.int32 and got["num_detections"].dtype == np.int32
    for image, want in enumerate(expected):
        count = min(len(want), max_det)
        assert got["num_detections"][image] == count
        np.testing.assert_allclose(got["boxes"][image, :count], want.boxes[:count], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(got["scores"][image, :count], want.scores[:count], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["classes"][image, :count], want.classes[:count])
        for name in ("boxes", "scores", "classes"):
            assert not got[name][image, count:].any(), f"{name} not zero past num_detections"


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
@pytest.mark.parametrize("batch", [1, 3])
def test_appended_nms_gives_what_decode_gives(tmp_path, layout, batch):
    task = Task(kind="detection", layout=layout, num_classes=CLASSES, score_threshold=0.3, iou_threshold=0.5)
    served = append_nms(raw_head(tmp_path / "raw.onnx", layout), tmp_path / "nms.onnx", task, max_detections=300)
    assert served == Task(kind="detection", layout="separate", num_classes=CLASSES, score_threshold=0.3,
                          iou_threshold=0.5, roles={r: r for r in ("boxes", "scores", "classes", "num_detections")})
    x = raw_values(batch, batch, layout)
    got = run(tmp_path / "nms.onnx", x)
    assert_equals_decode(got, {"output0": x}, task, 300)
    assert 20 < got["num_detections"].min() and got["num_detections"].max() < 300  # NMS had work, no cap hit
    # an app's view: decode of the new outputs by the returned task is decode of the raw ones
    for mine, theirs in zip(decode(got, served), decode({"output0": x}, task), strict=True):
        np.testing.assert_allclose(mine.boxes, theirs.boxes, atol=1e-3)


def test_the_thresholds_and_the_limit_are_the_tasks(tmp_path):
    raw = raw_head(tmp_path / "raw.onnx", "yolov8")
    x = raw_values(7, 2, "yolov8")
    results = {}
    for score, iou, max_det in ((0.25, 0.45, 300), (0.5, 0.45, 300), (0.25, 0.2, 300), (0.05, 0.7, 40)):
        task = Task(kind="detection", layout="yolov8", score_threshold=score, iou_threshold=iou)
        append_nms(raw, tmp_path / "nms.onnx", task, max_detections=max_det)
        got = run(tmp_path / "nms.onnx", x)
        assert_equals_decode(got, {"output0": x}, task, max_det)
        results[score, iou, max_det] = got["num_detections"].tolist()
        assert (got["scores"][got["scores"] > 0] > score).all()
    counts = list(results.values())
    assert len({tuple(c) for c in counts}) == len(counts), f"the thresholds made no difference: {results}"
    assert results[0.05, 0.7, 40] == [40, 40]  # capped at max_detections


def test_fewer_candidates_than_max_detections_pad_with_zeros(tmp_path):
    raw = raw_head(tmp_path / "raw.onnx", "yolov8", anchors=12, classes=2)
    task = Task(kind="detection", layout="yolov8", score_threshold=0.1)
    append_nms(raw, tmp_path / "nms.onnx", task, max_detections=100)  # more rows than classes × anchors
    x = raw_values(3, 3, "yolov8", anchors=12, classes=2)
    x[1, 4:] = 0.0  # an image with no detection at all
    got = run(tmp_path / "nms.onnx", x)
    assert_equals_decode(got, {"output0": x}, task, 100)
    assert got["num_detections"][1] == 0 and got["num_detections"][0] > 0


def test_the_batch_axis_stays_as_it_was(tmp_path):
    task = Task(kind="detection", layout="yolov8")
    append_nms(raw_head(tmp_path / "dynamic.onnx", "yolov8"), tmp_path / "d.onnx", task)
    append_nms(raw_head(tmp_path / "fixed.onnx", "yolov8", batch=2), tmp_path / "f.onnx", task)
    dynamic, fixed = onnx.load(str(tmp_path / "d.onnx")).graph, onnx.load(str(tmp_path / "f.onnx")).graph
    assert [o.name for o in dynamic.output] == ["boxes", "scores", "classes", "num_detections"]
    assert {o.type.tensor_type.shape.dim[0].dim_param for o in dynamic.output} == {"batch"}
    assert {o.type.tensor_type.shape.dim[0].dim_value for o in fixed.output} == {2}
    for batch in (1, 3, 5):  # any batch runs
        assert run(tmp_path / "d.onnx", raw_values(batch, batch, "yolov8"))["boxes"].shape == (batch, 100, 4)


@pytest.mark.parametrize("opset", [11, 12, 13, 18])
def test_every_opset_from_11_spells_its_operators(tmp_path, opset):
    task = Task(kind="detection", layout="yolov5", score_threshold=0.3)
    append_nms(raw_head(tmp_path / "raw.onnx", "yolov5", opset=opset), tmp_path / "nms.onnx", task)
    x = raw_values(opset, 2, "yolov5")
    assert_equals_decode(run(tmp_path / "nms.onnx", x), {"output0": x}, task, 100)


def test_an_fp16_head_is_suppressed_in_fp32(tmp_path):
    task = Task(kind="detection", layout="yolov8", score_threshold=0.3)
    append_nms(raw_head(tmp_path / "raw.onnx", "yolov8", elem_type=TensorProto.FLOAT16), tmp_path / "nms.onnx", task)
    x = raw_values(11, 2, "yolov8").astype(np.float16)
    got = run(tmp_path / "nms.onnx", x)
    assert got["boxes"].dtype == np.float32
    assert_equals_decode(got, {"output0": x.astype(np.float32)}, task, 100)


def test_what_it_cannot_decode_is_refused_in_one_line(tmp_path):
    raw = raw_head(tmp_path / "raw.onnx", "yolov8")
    refusals = {
        "end2end": (Task(kind="detection", layout="end2end"), raw),
        "classification": (Task(kind="classification"), raw),
        "opset": (Task(kind="detection", layout="yolov8"), raw_head(tmp_path / "old.onnx", "yolov8", opset=10)),
    }
    messages = {}
    for case, (task, path) in refusals.items():
        with pytest.raises(ConfigError) as info:
            append_nms(path, tmp_path / "nms.onnx", task)
        messages[case] = str(info.value)
    for limit in (0, 5000):
        with pytest.raises(ConfigError) as info:
            append_nms(raw, tmp_path / "nms.onnx", Task(kind="detection", layout="yolov8"), max_detections=limit)
        messages[f"limit {limit}"] = str(info.value)
    assert messages["limit 0"] == "max_detections must be 1 to 3840, got 0"
    assert "not to a detection task of layout end2end" in messages["end2end"]
    assert "not to a classification task" in messages["classification"]
    assert "opset 10" in messages["opset"] and "11 or newer" in messages["opset"]
    assert all("\n" not in m for m in messages.values())
    assert not (tmp_path / "nms.onnx").exists()


@pytest.mark.integration
def test_a_quantized_conv_detector_gets_nms_after_int8(tmp_path):
    """A small convolutional detector (YOLOv8 layout, grid anchors, sigmoid scores), exported by torch and
    quantized by ONNX Runtime's INT8 recipe, then NMS appended (the order the import uses, so the quantizer never
    sees the NMS part): its boxes are decode's of the quantized raw output."""
    import torch
    from torch import nn

    from components.export import quantize_ort_int8

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                          nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 4 + CLASSES, 1))
            ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
            self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()]) * 8 + 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.features(x).flatten(2)  # [b, 4 + classes, 64]
            centres = self.grid + torch.tanh(y[:, :2]) * 8
            sizes = torch.sigmoid(y[:, 2:4]) * 48
            return torch.cat([centres, sizes, torch.sigmoid(y[:, 4:])], 1)

    torch.manual_seed(0)
    model = Detector().eval()
    with torch.no_grad():
        model.features[-1].bias[4:] += 1.0  # scores around 0.7, so many boxes pass the threshold
    torch.onnx.export(model, (torch.zeros(2, 3, 64, 64),), str(tmp_path / "fp32.onnx"), input_names=["images"],
                      output_names=["output0"], dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
                      opset_version=17, dynamo=False)
    images = np.random.default_rng(0).uniform(0, 1, (16, 3, 64, 64)).astype(np.float32)
    quantize_ort_int8(tmp_path / "fp32.onnx", tmp_path / "int8-ort.onnx", {"images": images}, batch=8)
    task = Task(kind="detection", layout="yolov8", num_classes=CLASSES, score_threshold=0.5, iou_threshold=0.4)
    append_nms(tmp_path / "int8-ort.onnx", tmp_path / "int8-ort-nms.onnx", task, max_detections=50)
    x = images[:3]
    got = run(tmp_path / "int8-ort-nms.onnx", x)
    assert_equals_decode(got, run(tmp_path / "int8-ort.onnx", x), task, 50)
    assert got["num_detections"].min() > 0


@pytest.mark.integration
def test_a_real_ultralytics_yolov8n_export_gets_the_boxes_decode_gives(tmp_path):
    """YOLOv8n as ultralytics exports it (opset 17, 320 pixels, dynamic batch and anchors; random weights with
    detections, :mod:`tests.pipelines.yolo`): the appended NMS answers decode's boxes at batch 1 and 3."""
    from tests.pipelines.yolo import ULTRA_PY, Exporter, ExportSpec

    if not ULTRA_PY.exists():
        pytest.skip(f"no {ULTRA_PY}: ultralytics is not installed (make test installs it)")
    exporter = Exporter(ULTRA_PY, tmp_path)
    try:
        source = exporter.export(ExportSpec("yolov8n", opset=17, imgsz=320, dynamic=True))
    finally:
        exporter.close()
    task = Task(kind="detection", layout="yolov8", num_classes=80)
    served = append_nms(source, tmp_path / "nms.onnx", task)
    assert served.roles["boxes"] == "boxes"
    images = np.random.default_rng(0).random((3, 3, 320, 320), dtype=np.float32)
    for batch in (1, 3):
        got = run(tmp_path / "nms.onnx", images[:batch])
        assert_equals_decode(got, run(source, images[:batch]), task, 100)
        assert got["num_detections"].min() > 0
