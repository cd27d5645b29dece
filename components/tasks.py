"""What an imported model's outputs mean (:class:`~edgeloop_core.contract.Task`): stated by the user
(``import-onnx --task detection --layout yolov8``) or inferred from the outputs where they say it plainly.

:func:`infer_model_task` reads a model's outputs as the graph has them: a dynamic export declares
``[batch, 84, anchors]``, so every unknown size after the batch is taken from one ONNX Runtime run on a calibration
sample, and a final ``Concat`` of box rows and ``Sigmoid`` class scores on axis 1 marks a YOLOv8/v11 head whatever
the ratio of classes to anchors; an ultralytics export's ``names`` metadata gives an end-to-end detector its class
count. :func:`infer_task` then decides from the output specs alone.

Inferred: one ``[batch, classes]`` output is a classifier; one ``[batch, 4 + classes, anchors]`` output with many
more anchors than channels is a YOLOv8/v11 detection head, ``[batch, anchors, 5 + classes]`` with thousands of
anchors a YOLOv5 head, ``[batch, n, 6]`` with up to a thousand rows an end-to-end (NMS-included) detector such as
YOLOv10; four outputs named like boxes, scores, classes and a count are the separate layout. Anything else is
``raw``: each output compared on its own. A detection layout brings its slices (boxes apart from scores), so
validation never judges coordinates and scores as one number.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from edgeloop_core.contract import OutputSlice, Task, TensorSpec
from edgeloop_core.contract.manifest import DetectionLayout, TaskKind
from edgeloop_core.detection import layout_slices
from edgeloop_core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import onnx

KINDS: tuple[str, ...] = get_args(TaskKind)
LAYOUTS: tuple[str, ...] = get_args(DetectionLayout)
MIN_ANCHORS = 100
"""Fewer rows than this and a ``[batch, n, 5 + classes]`` output is not taken for a YOLOv5 head."""
ROLE_WORDS = {"boxes": ("box",), "scores": ("score", "conf"), "classes": ("class", "label"),
              "num_detections": ("num", "count")}


def _guess_layout(outputs: list[TensorSpec], scores_concat: bool = False) -> DetectionLayout | None:
    """The detection layout the output shapes (and ``scores_concat``: the one output ends in a Concat of box rows
    and Sigmoid scores on axis 1) say plainly; ``None`` where they do not."""
    if scores_concat and len(outputs) == 1 and len(outputs[0].shape) == 3 and outputs[0].shape[1] > 4:
        return "yolov8"
    if len(outputs) == 1 and len(outputs[0].shape) == 3 and min(outputs[0].shape[1:]) > 0:
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


def parse_slices(text: str) -> list[OutputSlice]:
    """Declared slices from ``--slice`` text: ``name=output:axis:start[:stop]``, several joined by ``,`` (e.g.
    ``boxes=out:2:0:4,scores=out:2:4``); a :class:`ConfigError` in one line for anything else."""
    slices = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, spec = item.partition("=")
        fields = spec.rsplit(":", 3) if spec.count(":") >= 3 else spec.rsplit(":", 2)
        try:
            output, axis, start, *stop = fields
            slices.append(OutputSlice(name=name, output=output, axis=int(axis), start=int(start),
                                      stop=int(stop[0]) if stop and stop[0] else None))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--slice {item!r} is not name=output:axis:start[:stop] (axis >= 1, start >= 0), "
                              f"e.g. boxes=output0:1:0:4") from exc
    return slices


def with_slices(task: Task, slices: list[OutputSlice], outputs: list[str]) -> Task:
    """``task`` with the user's declared ``slices`` in place of any it had; a :class:`ConfigError` naming a slice
    of an output the model does not have."""
    unknown = [s.name for s in slices if s.output not in outputs]
    if unknown:
        raise ConfigError(f"--slice {', '.join(unknown)} names an output the model does not have (outputs: "
                          f"{', '.join(outputs)})")
    return task.model_copy(update={"slices": slices}) if slices else task


def check_stated(kind: str, layout: str, slices: str = "") -> None:
    """A :class:`ConfigError` in one line when a stated ``--task``/``--layout``/``--slice`` is not one edgeloop
    knows, or a layout comes with a task other than detection (empty: to be inferred)."""
    parse_slices(slices)
    if kind and kind not in KINDS:
        raise ConfigError(f"--task {kind!r} is not one of {', '.join(KINDS)}")
    if layout and layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout and kind not in ("", "detection"):
        raise ConfigError(f"--layout is for detection, not --task {kind}")


def infer_task(outputs: list[TensorSpec], kind: str = "", layout: str = "", *, scores_concat: bool = False,
               num_classes: int | None = None) -> Task:
    """The task of a model with ``outputs``: ``kind``/``layout`` as stated, the rest inferred; a
    :class:`ConfigError` in one line when a stated layout does not fit the outputs.

    ``scores_concat`` and ``num_classes`` are what the graph says beyond the shapes (:func:`infer_model_task`):
    the one output is a Concat of boxes and Sigmoid scores on axis 1; how many classes the model names."""
    check_stated(kind, layout)
    guessed = _guess_layout(outputs, scores_concat)
    if kind == "detection" or layout:
        chosen = layout or guessed
        if chosen is None:
            raise ConfigError("a detection model needs --layout (yolov5, yolov8, end2end or separate): its outputs "
                              f"{[(o.name, o.shape) for o in outputs]} do not say which")
        return _detection(outputs, chosen, num_classes)
    if not kind:
        if guessed is not None:
            return _detection(outputs, guessed, num_classes)
        single_2d = len(outputs) == 1 and len(outputs[0].shape) == 2
        kind = "classification" if single_2d else "raw"
    return Task(kind=kind, num_classes=_num_classes(outputs, None) if kind == "classification" else None)


def _detection(outputs: list[TensorSpec], layout: str, named_classes: int | None = None) -> Task:
    if layout == "separate":
        roles = _roles(outputs)
        if not roles:
            raise ConfigError(f"the separate layout needs outputs named like boxes and scores, got "
                              f"{[o.name for o in outputs]}")
        return Task(kind="detection", layout="separate", roles=roles)
    if len(outputs) != 1 or len(outputs[0].shape) != 3:
        raise ConfigError(f"the {layout} layout has one output of rank 3, got {[(o.name, o.shape) for o in outputs]}")
    shape = outputs[0].shape
    least = {"yolov8": (1, 5), "yolov5": (2, 6), "end2end": (2, 6)}[layout]
    if 0 < shape[least[0]] < least[1]:
        raise ConfigError(f"the {layout} layout does not fit output {outputs[0].name!r} of shape {shape}: "
                          f"{LAYOUT_SHAPES[layout]}")
    base = Task(kind="detection", layout=layout, num_classes=_num_classes(outputs, layout) or named_classes)
    return base.model_copy(update={"slices": layout_slices(base, outputs[0].name)})


LAYOUT_SHAPES = {"yolov8": "it is [batch, 4 + classes, anchors]", "yolov5": "it is [batch, anchors, 5 + classes]",
                 "end2end": "it is [batch, detections, 6] (x1, y1, x2, y2, score, class)"}


def observed_outputs(model_path: Path, sample: dict[str, np.ndarray]) -> list[TensorSpec]:
    """The model's outputs as declared, with every unknown size after the batch axis filled in from one ONNX Runtime
    run on the first row of ``sample`` (as many as a fixed batch takes): the sizes at the calibration's input size;
    the batch axis stays as declared."""
    import onnxruntime as ort

    from components.intake import tensor_specs

    declared = tensor_specs(model_path)[1]
    if all(d >= 0 for spec in declared for d in spec.shape[1:]):
        return declared
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rows = {i.name: i.shape[0] if isinstance(i.shape[0], int) and i.shape[0] > 0 else 1 for i in session.get_inputs()}
    feed = {name: sample[name][:count] for name, count in rows.items()}  # a fixed batch takes that many rows
    ran = dict(zip(names, session.run(names, feed), strict=True))
    return [spec.model_copy(update={"shape": [spec.shape[0]] + [d if d >= 0 else int(ran[spec.name].shape[i + 1])
                                                                  for i, d in enumerate(spec.shape[1:])]})
            for spec in declared]


def _ends_in_scores_concat(graph: onnx.GraphProto) -> bool:
    """Whether the graph's one output is a Concat on axis 1 whose last part comes from a Sigmoid: box rows followed
    by class scores, as YOLOv8/v11 heads end."""
    if len(graph.output) != 1:
        return False
    producers = {out: node for node in graph.node for out in node.output}
    concat = producers.get(graph.output[0].name)
    if concat is None or concat.op_type != "Concat" or len(concat.input) < 2:
        return False
    axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
    last = producers.get(concat.input[-1])
    return axis in (1, -2) and last is not None and last.op_type == "Sigmoid"


def _named_classes(model: onnx.ModelProto) -> int | None:
    """How many classes the model's ``names`` metadata lists (ultralytics writes ``{0: 'person', ...}``)."""
    text = next((p.value for p in model.metadata_props if p.key == "names"), "")
    try:
        names = ast.literal_eval(text) if text else None
    except (ValueError, SyntaxError):
        return None
    return len(names) if isinstance(names, dict | list) and names else None


def infer_model_task(model_path: Path, sample: dict[str, np.ndarray], kind: str = "", layout: str = "") -> Task:
    """:func:`infer_task` for the ONNX model at ``model_path``, from what its graph says: the output sizes one run
    on ``sample`` (arrays by input name) shows where the declaration has none, whether it ends in a YOLOv8-style
    Concat of boxes and Sigmoid scores, and how many classes its metadata names."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return infer_task(observed_outputs(Path(model_path), sample), kind, layout,
                      scores_concat=_ends_in_scores_concat(model.graph), num_classes=_named_classes(model))
