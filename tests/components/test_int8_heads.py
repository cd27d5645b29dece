"""INT8 that is safe for detectors: both quantizers leave a detector's decode/concat head in floating point.

The test detector is YOLOv8-style (:class:`YoloV8Style`): a convolutional backbone with three strides (8, 16, 32),
per level a box branch (distribution-focal logits, decoded by a softmax and a fixed 1×1 convolution into distances,
then the anchor-grid and stride arithmetic into pixel boxes, tens to hundreds of pixels) and a class branch
(sigmoid), everything concatenated into one ``[batch, 4 + classes, anchors]`` tensor as ultralytics exports it.
Its weights are seeded and scaled (:func:`build_yolo_style`) so that the detections differ from image to image and
FP32 class scores reach about 0.5 — as in the issue, where ONNX Runtime's quantizer put the final Concat under one
UINT8 scale and every score became 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.export import (
    detector_head_nodes,
    name_nodes,
    quantize_modelopt_int8,
    quantize_ort_int8,
)
from components.import_onnx import run_all, tensor_specs
from components.tasks import infer_task
from edgeloop_core.contract import Task
from edgeloop_core.detection import decode, detection_f1
from edgeloop_core.quality import output_agreement, tensor_agreement

SIZE = 320
STRIDES = (8, 16, 32)
CLASSES = 2
REG_MAX = 16
INPUT, OUTPUT = "images", "output0"
BOX_LOGIT_STD = 1.5
"""Spread of the distribution-focal box logits: boxes differ between images (a negative control can see it)."""
SCORE_LOGIT_STD = 0.5
SCORE_QUANTILE = 0.99
"""The class biases put this quantile of the class logits at score 0.25 (the task's threshold): about 1 % of the
anchors are detections before NMS, and the best reach a score of 0.5–0.7."""


class YoloV8Style(nn.Module):
    """The YOLOv8 head on a small backbone: ``[batch, 3, 320, 320]`` → ``[batch, 4 + classes, 2100]`` (cx, cy, w, h
    in input pixels, then one sigmoid score per class)."""

    def __init__(self, widths: tuple[int, int, int] = (16, 24, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 8, 8), nn.SiLU())
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1), nn.SiLU())
                                  for i in range(2))
        self.box = nn.ModuleList(nn.Conv2d(c, 4 * REG_MAX, 1) for c in widths)
        self.cls = nn.ModuleList(nn.Conv2d(c, CLASSES, 1) for c in widths)
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1)
        points, strides = [], []
        for stride in STRIDES:
            cells = SIZE // stride
            ys, xs = torch.meshgrid(torch.arange(cells) + 0.5, torch.arange(cells) + 0.5, indexing="ij")
            points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)]))
            strides.append(torch.full((1, cells * cells), float(stride)))
        self.register_buffer("anchors", torch.cat(points, 1).unsqueeze(0))
        self.register_buffer("strides", torch.cat(strides, 1).unsqueeze(0))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = [self.stem(x)]
        for down in self.down:
            levels.append(down(levels[-1]))
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        # fixed sizes, not -1: the export then states the output's shape, [batch, 4 + classes, anchors], as
        # ultralytics' exports do (the task is inferred from it)
        levels = [torch.cat([self.box[i](f), self.cls[i](f)], 1).view(batch, 4 * REG_MAX + CLASSES, (SIZE // s) ** 2)
                  for i, (f, s) in enumerate(zip(self.features(x), STRIDES, strict=True))]
        box, cls = torch.cat(levels, 2).split((4 * REG_MAX, CLASSES), 1)
        anchors = sum((SIZE // s) ** 2 for s in STRIDES)
        distances = self.dfl(box.view(batch, 4, REG_MAX, anchors).transpose(2, 1).softmax(1)).view(batch, 4, anchors)
        left_top, right_bottom = distances[:, :2], distances[:, 2:]
        top_left, bottom_right = self.anchors - left_top, self.anchors + right_bottom
        boxes = torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], 1) * self.strides
        return torch.cat([boxes, cls.sigmoid()], 1)


def scenes(count: int, seed: int) -> np.ndarray:
    """``[count, 3, 320, 320]`` images with natural-image-like statistics: smooth structure (noise at 1/8 of the
    resolution, bilinearly upsampled) plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.standard_normal((count, 3, SIZE // 8, SIZE // 8)).astype(np.float32))
    smooth = nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
    return (smooth + rng.normal(0.0, 0.1, smooth.shape)).astype(np.float32)


def build_yolo_style(path: Path, seed: int = 0) -> Path:
    """Export a seeded :class:`YoloV8Style` to ONNX (opset 17, dynamic batch) at ``path``.

    Each level's output convolutions are rescaled on 16 images so their logits vary with the image (box logits
    with a spread of :data:`BOX_LOGIT_STD`, class logits :data:`SCORE_LOGIT_STD`), and the class biases put the
    :data:`SCORE_QUANTILE` of the class logits at the 0.25 score threshold."""
    import warnings

    torch.manual_seed(seed)
    model = YoloV8Style().eval()
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module is not model.dfl:
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    x = torch.from_numpy(scenes(16, seed=1000 + seed))
    with torch.no_grad():
        for i, level in enumerate(model.features(x)):
            for conv, spread in ((model.box[i], BOX_LOGIT_STD), (model.cls[i], SCORE_LOGIT_STD)):
                out = conv(level)
                gain = spread / (out - out.mean(dim=(0, 2, 3), keepdim=True)).std(dim=(0, 2, 3))
                conv.weight.mul_(gain.view(-1, 1, 1, 1))
                conv.bias.copy_(-out.mean(dim=(0, 2, 3)) * gain)
                if conv is model.cls[i]:
                    conv.bias.sub_(torch.quantile(conv(level).flatten(), SCORE_QUANTILE) - np.log(0.25 / 0.75))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x[:2],), str(path), input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=17,
                              dynamo=False)
    return path


def detector_task(path: Path) -> Task:
    """The task the import infers for the test detector (YOLOv8 layout, boxes and scores as declared slices)."""
    return infer_task(tensor_specs(path)[1])


def float_head_violations(path: Path, head: list[str]) -> list[str]:
    """Nodes of ``head`` (names) whose outputs the quantized model at ``path`` quantizes (feeds to a
    QuantizeLinear): in a float head nothing after the last convolutions is rounded to INT8 again."""
    import onnx

    graph = onnx.load(str(path)).graph
    quantized = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    names = set(head)
    return [node.name for node in graph.node if node.name in names and any(o in quantized for o in node.output)]


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> dict:
    """The exported detector, its task, calibration images and held-out images with the FP32 outputs."""
    path = build_yolo_style(tmp_path_factory.mktemp("yolo-style") / "detector.onnx")
    held = {INPUT: scenes(16, seed=7)}
    return {"path": path, "task": detector_task(path), "calibration": {INPUT: scenes(32, seed=1)}, "held": held,
            "reference": run_all(path, held)}


def test_the_test_detector_is_a_yolov8_head_with_detections_that_differ_per_image(detector):
    task, reference = detector["task"], detector["reference"]
    assert task.kind == "detection" and task.layout == "yolov8" and task.num_classes == CLASSES
    assert [s.name for s in task.slices] == ["boxes", "scores"]
    boxes, scores = reference[OUTPUT][:, :4], reference[OUTPUT][:, 4:]
    assert reference[OUTPUT].shape == (16, 4 + CLASSES, 2100)
    assert boxes.max() > 300 and 0.4 < scores.max() < 0.7  # pixels in the hundreds, scores reach ~0.5
    found = decode(reference, task)
    assert all(len(d) > 5 for d in found)
    assert detection_f1(found, found[1:] + found[:1]) < 0.5  # another image's detections do not match


def test_the_head_is_everything_after_the_last_convolution_on_each_path(detector):
    import onnx

    graph = onnx.load(str(detector["path"])).graph
    head = set(detector_head_nodes(detector["path"]))
    by_output = {out: node for node in graph.node for out in node.output}
    final = by_output[OUTPUT]
    assert final.op_type == "Concat" and final.name in head
    ops = {node.op_type for node in graph.node if node.name in head}
    assert {"Sigmoid", "Split", "Reshape", "Mul", "Sub", "Add", "Div", "Slice"} <= ops
    assert not ops & {"Conv", "MatMul", "Gemm"}
    # every convolution stays outside: the backbone's, each level's box and class convolutions, and the fixed
    # 1×1 convolution that turns the box distributions into distances (the last one on the box path, so the
    # softmax before it is not part of the head either)
    assert all(node.name not in head for node in graph.node if node.op_type in ("Conv", "Softmax"))
    assert sum(node.op_type == "Conv" for node in graph.node) == 1 + 2 + 3 + 3 + 1


def test_a_classifier_has_no_head_and_unnamed_nodes_get_names(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], weights)
    path = tmp_path / "classifier.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert detector_head_nodes(path) == []  # the output comes straight from a Gemm

    # the same graph with a sigmoid "head" after the Gemm, all nodes unnamed (as onnx.helper graphs often are)
    model = onnx.load(str(path))
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Sigmoid", ["raw"], ["logits"]))
    onnx.save(model, str(path))
    assert detector_head_nodes(path) == []  # no name to give the quantizers
    named = onnx.load(str(name_nodes(path))).graph.node
    assert len({n.name for n in named}) == len(named) and all(n.name for n in named)
    assert detector_head_nodes(path) == [named[-1].name] and named[-1].op_type == "Sigmoid"


def test_todays_cpu_quantizer_erases_every_score_and_one_cosine_passes_it(detector, tmp_path):
    """The bug, documented: without the float head, the final Concat gets one UINT8 scale of several pixels and
    every class score rounds to 0, while the old metric (one cosine over the whole output) still reads ≥ 0.999."""
    erasing = quantize_ort_int8(detector["path"], tmp_path / "int8-ort.onnx", detector["calibration"], batch=16)
    reference, task = detector["reference"], detector["task"]
    got = run_all(erasing, detector["held"])
    assert reference[OUTPUT][:, 4:].max() > 0.4 and got[OUTPUT][:, 4:].max() == 0.0
    assert output_agreement(reference, got) >= 0.999  # what the gate and the device judged by until now
    worst = tensor_agreement(reference, got, task.slices).worst()
    assert worst is not None and worst.part == f"{OUTPUT}[scores]" and worst.collapsed and worst.score == 0.0
    assert detection_f1(decode(reference, task), decode(got, task)) == 0.0  # not one detection left


@pytest.mark.parametrize("quantizer", ["ort", "modelopt"])
def test_with_a_float_head_int8_keeps_the_detections(detector, tmp_path, quantizer):
    head = detector_head_nodes(detector["path"])
    path = tmp_path / f"int8-{quantizer}.onnx"
    if quantizer == "ort":
        quantize_ort_int8(detector["path"], path, detector["calibration"], batch=16, float_head=True)
    else:
        quantize_modelopt_int8(detector["path"], path, detector["calibration"], float_head=True)
    assert float_head_violations(path, head) == []
    reference, task = detector["reference"], detector["task"]
    got = run_all(path, detector["held"])
    agreement = tensor_agreement(reference, got, task.slices)
    f1 = detection_f1(decode(reference, task), decode(got, task))
    print(f"int8-{quantizer} with a float head: detection F1 vs FP32 {f1:.4f}; {agreement.describe()}")
    assert f1 >= 0.95
    assert agreement.value > 0.99 and not any(part.collapsed for part in agreement.parts)


class CenterNetStyle(nn.Module):
    """A heatmap head whose peak search (MaxPool, Equal) runs on the scores: Model Optimizer quantizes that MaxPool
    unless told to leave the head alone."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 4, 4), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.heat, self.size = nn.Conv2d(16, 2, 1), nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        heat = self.heat(features).sigmoid()
        peaks = heat * (nn.functional.max_pool2d(heat, 3, 1, 1) == heat).float()
        return torch.cat([self.size(features).relu() * 4.0, peaks], 1).flatten(2)


def test_model_optimizer_leaves_a_heads_pooling_in_float_only_when_told(tmp_path):
    import onnx

    torch.manual_seed(0)
    source = tmp_path / "centernet.onnx"
    with torch.no_grad():
        torch.onnx.export(CenterNetStyle().eval(), (torch.randn(2, 3, 64, 64),), str(source), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    head = detector_head_nodes(source)
    nodes = onnx.load(str(source)).graph.node
    heatmap = next(n.name for n in nodes if n.op_type == "Sigmoid")
    assert {heatmap, *(n.name for n in nodes if n.op_type == "MaxPool")} <= set(head)
    calibration = {"x": np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)}
    plain = quantize_modelopt_int8(source, tmp_path / "plain.onnx", calibration)
    assert heatmap in float_head_violations(plain, head)  # left to itself it rounds the heatmap for the MaxPool
    kept = quantize_modelopt_int8(source, tmp_path / "kept.onnx", calibration, float_head=True)
    assert float_head_violations(kept, head) == []


def test_model_optimizer_leaves_onnx_runtimes_quantizer_as_it_found_it(detector, tmp_path):
    """Model Optimizer patches ONNX Runtime's quantization package for the whole process; without putting it back,
    the CPU quantizer run after it in the same process (a second import, a test) fails."""
    first = quantize_ort_int8(detector["path"], tmp_path / "first.onnx", detector["calibration"], batch=16)
    quantize_modelopt_int8(detector["path"], tmp_path / "qdq.onnx", detector["calibration"])
    again = quantize_ort_int8(detector["path"], tmp_path / "again.onnx", detector["calibration"], batch=16)
    assert again.read_bytes() == first.read_bytes()
