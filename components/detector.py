"""A small anchor-free single-stage detector whose ONNX export reads like a YOLOv8 one.

Design, and why:

* **Backbone**: five 3x3 conv + batch-norm + ReLU blocks (16, 32, 32, 64, 64 channels; strides 2, 2, 1, 2, 1), then
  one 3x3 head block (64). One output scale, stride 8: on 64x64 images an 8x8 grid, one anchor point per cell at
  the cell's centre. The shapes of the synthetic set are 10-24 pixels across, so each object's centre cell is its
  own (boxes at least 10 pixels wide, kept apart, have centres at least 11 pixels apart along one axis) and the
  receptive field (55 pixels) covers the largest object. Widths are multiples of 16 so Model Optimizer's FastNAS
  can prune channels.
* **Predictions per anchor point**: four distances (left, top, right, bottom) from the point to the box's sides, in
  strides, through ``softplus`` (positive, smooth, no overflow as ``exp`` can), as YOLOv8 and FCOS predict
  (anchor-free: no anchor boxes to tune); and one logit per class (sigmoid scores, no softmax: classes are
  independent, as in YOLOv8).
* **Decoding in the graph**: ``forward`` turns distances into ``cx, cy, w, h`` in input pixels and logits into
  sigmoid scores, and returns the YOLOv8 layout ``[batch, 4 + classes, anchors]`` (anchors in row-major grid
  order). :func:`edgeloop_core.detection.decode` with ``Task(kind="detection", layout="yolov8")`` reads it, and
  non-maximum suppression happens outside the graph, as for real YOLO exports. The decode is one submodule
  (:class:`Yolov8Decode`, ONNX node names under ``/decode/``) with no weights, so quantizers can be told to leave it
  (and the Concat that joins pixel-sized boxes with 0..1 scores) in floating point: one INT8 scale over both erases
  every score (issue 24).
* **Loss** (:func:`detection_loss`): centre-cell assignment (each box is the target of the cell its centre falls
  in), binary cross-entropy on every cell's class logits (positives: the centre cells' classes), summed and divided
  by the number of objects; GIoU plus L1 (on distances in strides) on the positive cells' boxes. No matching step,
  no anchor tuning, nothing data-dependent: from scratch, 8 epochs over the 1,600 training images take seconds on
  two CPU cores and reach mAP@0.5 0.98 on the test set. The class bias starts at the logit of 1% (RetinaNet's
  prior) so the many empty cells do not swamp the first steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own convention

if TYPE_CHECKING:
    from edgeloop_core.contract import Task

STRIDE = 8
"""Input pixels per grid cell."""
CLASS_PRIOR = 0.01
"""Initial score of every class at every cell."""
BOX_WEIGHT = 2.0
"""Weight of the GIoU term against the classification term."""
L1_WEIGHT = 0.5
"""Weight of the L1 term (distances in strides)."""


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Yolov8Decode(nn.Module):
    """Distances and logits per grid cell to the YOLOv8 layout ``[batch, 4 + classes, cells]``: ``cx, cy, w, h`` in
    input pixels, then sigmoid class scores. No weights: quantizers leave it in floating point when told so."""

    def __init__(self, grid: int, stride: int, num_classes: int) -> None:
        super().__init__()
        self.stride, self.num_classes = stride, num_classes
        self.cells = grid * grid
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * stride
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("points", torch.stack([xs, ys])[None], persistent=False)  # [1, 2, grid, grid]

    def distances(self, box_raw: torch.Tensor) -> torch.Tensor:
        """Left, top, right, bottom distances in input pixels (``[batch, 4, grid, grid]``)."""
        return F.softplus(box_raw) * self.stride

    def forward(self, box_raw: torch.Tensor, class_raw: torch.Tensor) -> torch.Tensor:
        ltrb = self.distances(box_raw)
        top_left = self.points - ltrb[:, :2]
        bottom_right = self.points + ltrb[:, 2:]
        centre = (top_left + bottom_right) * 0.5
        size = bottom_right - top_left
        joined = torch.cat([centre, size, torch.sigmoid(class_raw)], dim=1)
        # a constant target shape (batch inferred): the export then declares [batch, 4 + classes, anchors]
        return joined.reshape(-1, 4 + self.num_classes, self.cells)


class TinyDetector(nn.Module):
    """Backbone, one head block, 1x1 box and class convolutions, and the in-graph decode (see the module docstring)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        from edgeloop_core.errors import ConfigError

        if image_size % STRIDE:
            raise ConfigError(f"the detector needs an input size divisible by {STRIDE}, got {image_size}")
        self.features = nn.Sequential(
            _block(in_channels, 16, 2),
            _block(16, 32, 2),
            _block(32, 32, 1),
            _block(32, 64, 2),
            _block(64, 64, 1),
            _block(64, 64, 1),
        )
        self.boxes = nn.Conv2d(64, 4, 1)
        self.classes = nn.Conv2d(64, num_classes, 1)
        nn.init.constant_(self.classes.bias, float(np.log(CLASS_PRIOR / (1 - CLASS_PRIOR))))
        self.decode = Yolov8Decode(image_size // STRIDE, STRIDE, num_classes)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box distances (before softplus) and class logits per cell: ``[batch, 4, g, g]``, ``[batch, C, g, g]``."""
        features = self.features(x)
        return self.boxes(features), self.classes(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.raw(x))


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matching rows of two ``[n, 4]`` xyxy box tensors."""
    top_left, bottom_right = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(dim=1), (b[:, 2:] - b[:, :2]).prod(dim=1)
    union = area_a + area_b - overlap
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(dim=1)
    iou = overlap / union.clamp(min=1e-6)
    return iou - (hull - union) / hull.clamp(min=1e-6)


def detection_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of ``model`` (a :class:`TinyDetector`, pruned or quantized) on images ``x`` with box
    tables ``targets`` (``[batch, max_objects, 5]``: class, x1, y1, x2, y2 in pixels; class -1 pads)."""
    box_raw, class_raw = model.raw(x)
    decode: Yolov8Decode = model.decode
    batch, _, grid, _ = class_raw.shape
    rows, slots = torch.nonzero(targets[..., 0] >= 0, as_tuple=True)
    boxes = targets[rows, slots, 1:]
    classes = targets[rows, slots, 0].long()
    cells = ((boxes[:, :2] + boxes[:, 2:]) * 0.5 / decode.stride).floor().long().clamp(0, grid - 1)
    col, row = cells[:, 0], cells[:, 1]
    wanted = torch.zeros_like(class_raw)
    wanted[rows, classes, row, col] = 1.0
    positives = max(len(rows), 1)
    class_loss = F.binary_cross_entropy_with_logits(class_raw, wanted, reduction="sum") / positives
    if not len(rows):
        return class_loss
    ltrb = decode.distances(box_raw)[rows, :, row, col]  # [n, 4] pixels
    point = decode.points[0, :, row, col].T  # [n, 2]
    predicted = torch.cat([point - ltrb[:, :2], point + ltrb[:, 2:]], dim=1)
    target_ltrb = torch.cat([point - boxes[:, :2], boxes[:, 2:] - point], dim=1)
    box_loss = (1.0 - _giou(predicted, boxes)).sum() / positives
    l1 = (ltrb - target_ltrb).abs().sum() / decode.stride / positives
    return class_loss + BOX_WEIGHT * box_loss + L1_WEIGHT * l1


OUTPUT_NAME = "detections"
"""The exported model's one output: ``[batch, 4 + classes, anchors]``."""
SCORE_THRESHOLD = 0.05
"""The task's score threshold: detections scoring below it are dropped before NMS. 0.05 is torchvision's and
Detectron2's test-time default: low enough that mAP sees nearly the whole precision-recall curve (at YOLO's 0.25
the shapes' least confident true detections fall off it: mAP@0.5 0.965 instead of 0.984 for the same model), and
that INT8 nudging a score across it moves no figure."""


def detection_scores(outputs: np.ndarray, table: np.ndarray, image_size: int) -> tuple[float, float]:
    """COCO ``(mAP@0.5, mAP@0.5:0.95)`` of YOLOv8-layout ``outputs`` (``[images, 4 + classes, anchors]``) against
    box tables ``table`` of ``image_size``-square images, decoded and suppressed as :func:`detection_task` says
    (as the device does)."""
    from components.detection_data import table_to_coco
    from edgeloop_core.detection import decode, detection_map

    num_classes = outputs.shape[1] - 4
    task = detection_task(num_classes)
    labels = table_to_coco(table, image_size, [str(c) for c in range(num_classes)])
    return detection_map(decode({OUTPUT_NAME: outputs}, task), labels)


def control_map50(outputs: np.ndarray, table: np.ndarray, image_size: int, seed: int = 0) -> float:
    """The negative control of :func:`detection_scores`: mAP@0.5 with each image's detections scored against
    another image's labels (:func:`edgeloop_core.quality.derangement`). A test set that can judge a detector puts
    it far below the detector's own mAP@0.5."""
    from edgeloop_core.quality import derangement

    return detection_scores(outputs[derangement(len(outputs), seed)], table, image_size)[0]


def detection_task(num_classes: int, output: str = OUTPUT_NAME) -> Task:
    """The manifest task of this detector's export: YOLOv8 layout, its box and score slices, and
    :data:`SCORE_THRESHOLD`."""
    from edgeloop_core.contract import Task
    from edgeloop_core.detection import layout_slices

    base = Task(kind="detection", layout="yolov8", num_classes=num_classes, score_threshold=SCORE_THRESHOLD)
    return base.model_copy(update={"slices": layout_slices(base, output)})
