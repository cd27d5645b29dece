"""Detections from a detector's raw outputs, and how two sets of detections (or detections and labels) agree.

:func:`decode` turns the outputs of every :data:`~edgeloop_core.contract.manifest.DetectionLayout` into boxes
(``x1, y1, x2, y2`` in input pixels), scores and classes per image, applying the task's score threshold and, for
layouts that come before NMS (YOLOv5/v8/v11), class-aware non-maximum suppression. :func:`detection_f1` matches
boxes to a reference's at IoU 0.5 (label-free validation against FP32); :func:`detection_map` computes COCO
mAP@0.5 and mAP@0.5:0.95 against COCO-format labels with ``faster-coco-eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from edgeloop_core.contract import OutputSlice, Task

MAX_DETECTIONS = 300
"""Detections kept per image after NMS (COCO's evaluation counts at most 100)."""
MATCH_IOU = 0.5
"""Overlap at which a detection matches a reference box of the same class."""


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``boxes`` ``[n, 4]`` (x1, y1, x2, y2), ``scores`` ``[n]``, ``classes`` ``[n]``."""

    boxes: NDArray[np.float64]
    scores: NDArray[np.float64]
    classes: NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.scores)


def _xyxy(cxcywh: NDArray[np.float64]) -> NDArray[np.float64]:
    half = cxcywh[:, 2:4] / 2
    return np.concatenate([cxcywh[:, :2] - half, cxcywh[:, :2] + half], axis=1)


def box_iou(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Pairwise IoU of ``[n, 4]`` and ``[m, 4]`` xyxy boxes: ``[n, m]``."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    overlap = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - overlap
    same = np.all(a[:, None, :] == b[None, :, :], axis=2)  # two empty boxes in one place still match each other
    return np.where(union > 0, overlap / np.maximum(union, 1e-12), np.where(same, 1.0, 0.0))


def nms(boxes: NDArray[np.float64], scores: NDArray[np.float64], classes: NDArray[np.int64], iou: float,
        limit: int = MAX_DETECTIONS) -> NDArray[np.intp]:
    """Indices kept by class-aware greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        overlaps = box_iou(boxes[best : best + 1], boxes[rest])[0]
        order = rest[(overlaps <= iou) | (classes[rest] != classes[best])]
    return np.asarray(keep, dtype=np.intp)


def _kept(boxes: NDArray[np.float64], scores: NDArray[np.float64], classes: NDArray[np.int64], task: Task, *,
          suppress: bool) -> Detections:
    mask = scores > task.score_threshold
    boxes, scores, classes = boxes[mask], scores[mask], classes[mask]
    # corners in order (x1 <= x2, y1 <= y2): an untrained or foreign head may emit them swapped
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)
    if suppress:
        keep = nms(boxes, scores, classes, task.iou_threshold)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    return Detections(boxes.astype(np.float64), scores.astype(np.float64), classes.astype(np.int64))


def _single(outputs: dict[str, NDArray[Any]], task: Task) -> NDArray[np.float64]:
    name = task.roles.get("detections") or next(iter(outputs))
    return np.asarray(outputs[name], dtype=np.float64)


def _decode_image(outputs: dict[str, NDArray[Any]], index: int, task: Task) -> Detections:
    if task.layout == "yolov8":
        raw = _single(outputs, task)[index].T  # [anchors, 4 + classes]
        scores = raw[:, 4:]
        return _kept(_xyxy(raw[:, :4]), scores.max(axis=1), scores.argmax(axis=1), task, suppress=True)
    if task.layout == "yolov5":
        raw = _single(outputs, task)[index]  # [anchors, 5 + classes]
        scores = raw[:, 5:] * raw[:, 4:5]
        return _kept(_xyxy(raw[:, :4]), scores.max(axis=1), scores.argmax(axis=1), task, suppress=True)
    if task.layout == "end2end":
        raw = _single(outputs, task)[index]  # [detections, 6]
        return _kept(raw[:, :4], raw[:, 4], raw[:, 5].astype(np.int64), task, suppress=False)
    if task.layout == "separate":
        boxes = np.asarray(outputs[task.roles["boxes"]][index], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(outputs[task.roles["scores"]][index], dtype=np.float64)
        if scores.ndim == 2:  # one score per class
            classes, scores = scores.argmax(axis=1), scores.max(axis=1)
        elif "classes" in task.roles:
            classes = np.asarray(outputs[task.roles["classes"]][index]).reshape(-1).astype(np.int64)
        else:
            classes = np.zeros(len(scores), dtype=np.int64)
        scores = scores.reshape(-1)
        if "num_detections" in task.roles:
            count = int(np.asarray(outputs[task.roles["num_detections"]][index]).reshape(-1)[0])
            boxes, scores, classes = boxes[:count], scores[:count], classes[:count]
        return _kept(boxes, scores, classes, task, suppress=False)
    raise ValueError(f"task {task.kind!r} has no detection layout to decode")


def decode(outputs: dict[str, NDArray[Any]], task: Task) -> list[Detections]:
    """Every image's detections from a batch of raw outputs laid out as ``task.layout``."""
    count = len(next(iter(outputs.values())))
    return [_decode_image(outputs, i, task) for i in range(count)]


def layout_slices(task: Task, output: str) -> list[OutputSlice]:
    """The slices a single-output detection layout declares for ``output``: boxes apart from scores (and from
    objectness and classes), so each is compared on its own."""
    from edgeloop_core.contract import OutputSlice

    cuts: dict[str, tuple[int, list[tuple[str, int, int | None]]]] = {
            "yolov8": (1, [("boxes", 0, 4), ("scores", 4, None)]),
            "yolov5": (2, [("boxes", 0, 4), ("objectness", 4, 5), ("scores", 5, None)]),
            "end2end": (2, [("boxes", 0, 4), ("scores", 4, 5), ("classes", 5, 6)])}
    if task.layout not in cuts:
        return []
    axis, parts = cuts[task.layout]
    return [OutputSlice(name=name, output=output, axis=axis, start=start, stop=stop) for name, start, stop in parts]


def _match(reference: Detections, got: Detections, iou: float) -> int:
    """True positives: ``got`` boxes (best score first) matched one-to-one to same-class reference boxes."""
    if not len(reference) or not len(got):
        return 0
    overlaps = box_iou(got.boxes, reference.boxes)
    overlaps[got.classes[:, None] != reference.classes[None, :]] = 0.0
    taken = np.zeros(len(reference), dtype=bool)
    matched = 0
    for row in np.argsort(-got.scores, kind="stable"):
        candidates = np.where(taken, -1.0, overlaps[row])
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            taken[best] = True
            matched += 1
    return matched


def detection_f1(reference: Sequence[Detections], got: Sequence[Detections], iou: float = MATCH_IOU) -> float:
    """F1 of ``got``'s detections against ``reference``'s over all images (1.0 when neither has any)."""
    true_pos = sum(_match(r, g, iou) for r, g in zip(reference, got, strict=True))
    found, expected = sum(len(g) for g in got), sum(len(r) for r in reference)
    if found + expected == 0:
        return 1.0
    return 2.0 * true_pos / (found + expected)


def detection_map(detections: Sequence[Detections], labels: dict[str, Any]) -> tuple[float, float]:
    """COCO ``(mAP@0.5, mAP@0.5:0.95)`` of ``detections`` (one per image, in the order of ``labels["images"]``)
    against COCO-format ``labels`` (``images``, ``annotations`` with ``bbox`` as x, y, w, h, ``categories``)."""
    from faster_coco_eval import COCO, COCOeval_faster  # type: ignore[import-untyped]  # ships no type hints

    images = [image["id"] for image in labels["images"]]
    if len(images) != len(detections):
        raise ValueError(f"{len(detections)} images of detections for {len(images)} labelled images")
    results = [{"image_id": image, "category_id": int(c), "score": float(s),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
               for image, found in zip(images, detections, strict=True)
               for b, s, c in zip(found.boxes, found.scores, found.classes, strict=True)]
    if not results:
        return 0.0, 0.0
    truth = COCO(labels)
    evaluation = COCOeval_faster(truth, truth.loadRes(results), iouType="bbox", print_function=lambda *_: None)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    stats = evaluation.stats
    return max(0.0, float(stats[1])), max(0.0, float(stats[0]))
