"""What an imported model's outputs mean (:class:`~edgeloop_core.contract.Task`): stated by the user
(``import-onnx --task detection --layout yolov8``) or inferred from the output shapes where they say it plainly.

Inferred: one ``[batch, classes]`` output is a classifier; one ``[batch, 4 + classes, anchors]`` output with many
more anchors than channels is a YOLOv8/v11 detection head, ``[batch, anchors, 5 + classes]`` with thousands of
anchors a YOLOv5 head, ``[batch, n, 6]`` with up to a thousand rows an end-to-end (NMS-included) detector such as
YOLOv10; four outputs named like boxes, scores, classes and a count are the separate layout. Anything else is
``raw``: each output compared on its own. A detection layout brings its slices (boxes apart from scores), so
validation never judges coordinates and scores as one number.
"""

from __future__ import annotations

from typing import get_args

from edgeloop_core.contract import Task, TensorSpec
from edgeloop_core.contract.manifest import DetectionLayout, TaskKind
from edgeloop_core.detection import layout_slices
from edgeloop_core.errors import ConfigError

KINDS: tuple[str, ...] = get_args(TaskKind)
LAYOUTS: tuple[str, ...] = get_args(DetectionLayout)
MIN_ANCHORS = 100
"""Fewer rows than this and a ``[batch, n, 5 + classes]`` output is not taken for a YOLOv5 head."""
ROLE_WORDS = {"boxes": ("box",), "scores": ("score", "conf"), "classes": ("class", "label"),
              "num_detections": ("num", "count")}


def _guess_layout(outputs: list[TensorSpec]) -> DetectionLayout | None:
    if len(outputs) == 1 and len(outputs[0].shape) == 3:
        _, rows, cols = outputs[0].shape
        if rows > 4 and cols > rows * 4:
            return "yolov8"
        if cols == 6 and 0 < rows <= 1000:
            return "end2end"
        if cols > 5 and rows >= MIN_ANCHORS:
            return "yolov5"
    if len(outputs) >= 2 and _roles(outputs):
        return "separate"
    return None


def _roles(outputs: list[TensorSpec]) -> dict[str, str]:
    """Outputs named like a separate-layout detector's, when their shapes fit it too: boxes ``[batch, n, 4]``,
    scores ``[batch, n]`` or ``[batch, n, classes]``."""
    roles: dict[str, str] = {}
    for role, words in ROLE_WORDS.items():
        for spec in outputs:
            if spec.name not in roles.values() and any(w in spec.name.lower() for w in words):
                roles[role] = spec.name
                break
    shapes = {spec.name: spec.shape for spec in outputs}
    boxes, scores = shapes.get(roles.get("boxes", "")), shapes.get(roles.get("scores", ""))
    if boxes is None or scores is None or len(boxes) != 3 or boxes[2] not in (4, -1) or len(scores) not in (2, 3):
        return {}
    return roles


def _num_classes(outputs: list[TensorSpec], layout: str | None) -> int | None:
    shape = outputs[0].shape
    count = {"yolov8": shape[1] - 4 if len(shape) == 3 else -1,
             "yolov5": shape[2] - 5 if len(shape) == 3 else -1}.get(layout or "", -1)
    if layout is None and len(outputs) == 1 and len(shape) == 2:
        count = shape[1]
    return count if count > 0 else None


def infer_task(outputs: list[TensorSpec], kind: str = "", layout: str = "") -> Task:
    """The task of a model with ``outputs``: ``kind``/``layout`` as stated, the rest inferred; a
    :class:`ConfigError` in one line when a stated layout does not fit the outputs."""
    if kind and kind not in KINDS:
        raise ConfigError(f"--task {kind!r} is not one of {', '.join(KINDS)}")
    if layout and layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout and kind not in ("", "detection"):
        raise ConfigError(f"--layout is for detection, not --task {kind}")
    guessed = _guess_layout(outputs)
    if kind == "detection" or layout:
        chosen = layout or guessed
        if chosen is None:
            raise ConfigError("a detection model needs --layout (yolov5, yolov8, end2end or separate): its outputs "
                              f"{[(o.name, o.shape) for o in outputs]} do not say which")
        return _detection(outputs, chosen)
    if not kind:
        if guessed is not None:
            return _detection(outputs, guessed)
        single_2d = len(outputs) == 1 and len(outputs[0].shape) == 2
        kind = "classification" if single_2d else "raw"
    return Task(kind=kind, num_classes=_num_classes(outputs, None) if kind == "classification" else None)


def _detection(outputs: list[TensorSpec], layout: str) -> Task:
    if layout == "separate":
        roles = _roles(outputs)
        if not roles:
            raise ConfigError(f"the separate layout needs outputs named like boxes and scores, got "
                              f"{[o.name for o in outputs]}")
        return Task(kind="detection", layout="separate", roles=roles)
    if len(outputs) != 1 or len(outputs[0].shape) != 3:
        raise ConfigError(f"the {layout} layout has one output of rank 3, got {[(o.name, o.shape) for o in outputs]}")
    base = Task(kind="detection", layout=layout, num_classes=_num_classes(outputs, layout))
    return base.model_copy(update={"slices": layout_slices(base, outputs[0].name)})
