"""Task-aware quality measures: each output and slice on its own, negative controls, detections."""

from __future__ import annotations

import numpy as np
import pytest

from edgeloop_core.contract import OutputSlice, Task
from edgeloop_core.detection import Detections, decode, detection_f1, detection_map, layout_slices, nms
from edgeloop_core.quality import (
    check_informative,
    negative_control,
    output_agreement,
    tensor_agreement,
    top1_agreement,
)

YOLO = Task(kind="detection", layout="yolov8", num_classes=3)


def yolo_head(count: int = 16, anchors: int = 64, seed: int = 0) -> np.ndarray:
    """Raw YOLOv8-style outputs: box centres and sizes in pixels (tens to hundreds) above class scores in [0, 1]."""
    rng = np.random.default_rng(seed)
    boxes = np.concatenate([rng.uniform(20, 300, (count, 2, anchors)), rng.uniform(8, 60, (count, 2, anchors))], 1)
    scores = rng.uniform(0, 1, (count, 3, anchors)) ** 4
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


def test_erased_scores_pass_one_cosine_but_fail_the_scores_slice():
    reference = {"output0": yolo_head()}
    erased = reference["output0"].copy()
    erased[:, 4:, :] = 0.0  # what ORT's INT8 did to YOLOv8's class scores under one scale for the concat
    got = {"output0": erased}
    assert output_agreement(reference, got) > 0.999  # the old gate: passed
    agreement = tensor_agreement(reference, got, layout_slices(YOLO, "output0"))
    assert agreement.value == 0.0
    worst = agreement.worst()
    assert worst is not None and worst.part == "output0[scores]" and worst.collapsed
    assert "all zeros" in worst.reason
    assert [p.part for p in agreement.parts] == ["output0[boxes]", "output0[scores]"]
    assert detection_f1(decode(reference, YOLO), decode(got, YOLO)) == 0.0


def test_a_collapse_confined_to_any_declared_slice_fails():
    rng = np.random.default_rng(1)
    reference = {"embedding": rng.normal(size=(20, 8)).astype(np.float32),
                 "aux": rng.normal(size=(20, 3)).astype(np.float32)}
    slices = [OutputSlice(name="head", output="embedding", axis=1, start=0, stop=6),
              OutputSlice(name="tail", output="embedding", axis=1, start=6)]
    for broken in ("head", "tail"):
        got = {k: v.copy() for k, v in reference.items()}
        cut = slice(0, 6) if broken == "head" else slice(6, None)
        got["embedding"][:, cut] = got["embedding"][:, cut].mean(axis=0)  # the same value for every sample
        agreement = tensor_agreement(reference, got, slices)
        assert agreement.value == 0.0 and agreement.worst().part == f"embedding[{broken}]"
        assert "no variation" in agreement.worst().reason
    assert tensor_agreement(reference, reference, slices).value == pytest.approx(1.0)


def test_another_samples_output_or_the_batch_mean_fail_where_one_cosine_passed():
    rng = np.random.default_rng(2)
    bias = np.linspace(5, 15, 10)  # a shared direction, as random-init and imported classifiers have
    logits = (bias + rng.normal(scale=0.5, size=(40, 10))).astype(np.float32)
    reference = {"logits": logits}
    previous = {"logits": np.roll(logits, 1, axis=0)}
    mean = {"logits": np.repeat(logits.mean(axis=0, keepdims=True), 40, axis=0)}
    assert output_agreement(reference, previous) > 0.99  # the old metric could not tell
    assert tensor_agreement(reference, previous).value < 0.3
    assert tensor_agreement(reference, mean).value == 0.0
    noisy = {"logits": logits + rng.normal(scale=0.02, size=logits.shape).astype(np.float32)}
    assert tensor_agreement(reference, noisy).value > 0.99
    assert top1_agreement(reference, previous, Task()) < 0.9  # below a 0.98 gate, though most share a class
    assert check_informative("top1_agreement", negative_control("top1_agreement", reference, Task()), 0.98) is None
    assert check_informative("tensor_agreement", negative_control("tensor_agreement", reference, Task()), 0.98) is None


def test_the_negative_control_refuses_a_set_that_cannot_judge():
    rng = np.random.default_rng(3)
    varied = {"logits": rng.normal(size=(50, 10)).astype(np.float32)}
    control = negative_control("top1_agreement", varied, Task())
    assert control < 0.3 and check_informative("top1_agreement", control, 0.98) is None
    same_class = {"logits": np.tile(np.arange(10, dtype=np.float32), (50, 1)) + rng.normal(scale=0.01, size=(50, 10))}
    control = negative_control("top1_agreement", same_class, Task())
    reason = check_informative("top1_agreement", control, 0.98)
    assert control == 1.0 and reason is not None and "cannot tell right from wrong" in reason
    empty = {"output0": np.zeros((8, 7, 64), np.float32)}  # a detector that finds nothing on any validation image
    assert check_informative("detection_f1", negative_control("detection_f1", empty, YOLO), 0.95) is not None


def test_decode_and_nms_keep_the_best_of_overlapping_boxes_per_class():
    raw = np.zeros((1, 7, 4), np.float32)  # 3 classes, 4 anchors
    raw[0, :4, 0] = [50, 50, 20, 20]
    raw[0, :4, 1] = [51, 51, 20, 20]  # overlaps anchor 0, same class: suppressed
    raw[0, :4, 2] = [51, 51, 20, 20]  # same place, another class: kept
    raw[0, :4, 3] = [200, 200, 10, 10]
    raw[0, 4, 0], raw[0, 4, 1], raw[0, 5, 2], raw[0, 6, 3] = 0.9, 0.8, 0.7, 0.1  # anchor 3 below the threshold
    (found,) = decode({"output0": raw}, YOLO)
    assert found.classes.tolist() == [0, 1] and found.scores.tolist() == pytest.approx([0.9, 0.7])
    assert found.boxes[0].tolist() == [40, 40, 60, 60]
    keep = nms(np.array([[0, 0, 10, 10], [1, 1, 11, 11.0]]), np.array([0.5, 0.6]), np.array([0, 0]), 0.45)
    assert keep.tolist() == [1]


def test_end2end_and_separate_layouts_decode_alike():
    end2end = np.array([[[10, 10, 30, 30, 0.9, 2], [0, 0, 5, 5, 0.1, 0], [0, 0, 0, 0, 0, 0]]], np.float32)
    (a,) = decode({"dets": end2end}, Task(kind="detection", layout="end2end"))
    separate = Task(kind="detection", layout="separate",
                    roles={"boxes": "b", "scores": "s", "classes": "c", "num_detections": "n"})
    (b,) = decode({"b": end2end[:, :, :4], "s": end2end[:, :, 4], "c": end2end[:, :, 5],
                   "n": np.array([[2]], np.int64)}, separate)
    for found in (a, b):
        assert found.boxes.tolist() == [[10, 10, 30, 30]] and found.classes.tolist() == [2]


def test_detection_f1_and_map_against_labels():
    boxes = [np.array([[10, 10, 50, 50.0]]), np.array([[60, 60, 100, 120.0], [5, 5, 20, 20.0]])]
    classes = [np.array([1]), np.array([0, 2])]
    found = [Detections(b, np.full(len(b), 0.9), c) for b, c in zip(boxes, classes, strict=True)]
    labels = {"images": [{"id": i + 1, "width": 128, "height": 128} for i in range(2)],
              "categories": [{"id": c, "name": str(c)} for c in range(3)],
              "annotations": [{"id": n + 1, "image_id": i + 1, "category_id": int(c), "iscrowd": 0,
                               "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])}
                              for n, (i, b, c) in enumerate((i, b, c) for i in range(2)
                                                            for b, c in zip(boxes[i], classes[i], strict=True))]}
    assert detection_map(found, labels) == pytest.approx((1.0, 1.0))
    wrong = [Detections(d.boxes, d.scores, (d.classes + 1) % 3) for d in found]
    assert detection_map(wrong, labels)[0] == pytest.approx(0.0)
    assert detection_f1(found, found) == 1.0 and detection_f1(found, wrong) == 0.0
    assert detection_f1(found, [found[1], found[0]]) == 0.0


def test_a_detection_task_names_its_layout():
    with pytest.raises(ValueError) as missing:
        Task(kind="detection")
    assert "layout" in str(missing.value)
    with pytest.raises(ValueError) as roles:
        Task(kind="detection", layout="separate", roles={"boxes": "b"})
    assert "scores" in str(roles.value)
