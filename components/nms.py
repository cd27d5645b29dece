"""Boxes an app can use: decode and non-maximum suppression appended to a detector's own ONNX graph.

A YOLOv5/v8/v11 export ends in one raw tensor (every anchor's box and class scores, before NMS); an app on the
device then has to decode and suppress it itself. :func:`append_nms` appends both to the graph, with ONNX
``NonMaxSuppression`` (opset 11 and newer; ONNX Runtime runs it, TensorRT 10's parser maps it to its NMS layer), so
the served model answers with the separate layout (:data:`~edgeloop_core.contract.manifest.DetectionLayout`):

* ``boxes`` ``[batch, max_detections, 4]`` FP32, ``x1, y1, x2, y2`` in input pixels;
* ``scores`` ``[batch, max_detections]`` FP32, best first;
* ``classes`` ``[batch, max_detections]`` INT32;
* ``num_detections`` ``[batch]`` INT32: rows past it are zeros.

What the appended part computes is what :func:`edgeloop_core.detection.decode` computes on the raw output: each
anchor's best class (YOLOv5: objectness × class score), boxes scoring above the task's ``score_threshold``, greedy
NMS per class at its ``iou_threshold``, at most ``max_detections`` per image, best first. The batch axis stays as it
was (dynamic stays dynamic). Append it after quantization, to every variant: the quantizers then never see the
NMS part, and INT8 cannot flatten the scores it ranks by.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeloop_core.contract import Task
from edgeloop_core.errors import ConfigError

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 11
"""``NonMaxSuppression`` with its opset-11 semantics, ``Range``, ``ScatterND``, ``GatherND``."""
LAYOUTS = ("yolov8", "yolov5")
"""The single-output layouts decoded here; ``end2end`` and ``separate`` models come with NMS already."""
OUTPUT_NAMES = ("boxes", "scores", "classes", "num_detections")
PREFIX = "edgeloop_nms/"
"""Every tensor and node the appended part adds is named under this prefix."""
INT64_MAX = np.iinfo(np.int64).max
MAX_DETECTIONS = 3840
"""The most boxes per image: TensorRT's TopK layer, which ranks the kept boxes, takes k up to 3840."""


class _Graph:
    """Appends nodes under :data:`PREFIX` to ``model``'s graph, writing each operator the way ``opset`` spells it."""

    def __init__(self, model: onnx.ModelProto, opset: int) -> None:
        self.model, self.opset, self.count = model, opset, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{PREFIX}{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int = 1, **attrs: object) -> list[str]:
        from onnx import helper

        names = [self.name(f"{hint}{i}" if outputs > 1 else hint) for i in range(outputs)]
        self.model.graph.node.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names

    def one(self, op_type: str, inputs: list[str], hint: str, **attrs: object) -> str:
        return self.op(op_type, inputs, hint, **attrs)[0]

    def slice(self, x: str, axis: int, start: int, stop: int, hint: str) -> str:
        return self.one("Slice", [x, self.const("start", np.array([start])), self.const("stop", np.array([stop])),
                                  self.const("axis", np.array([axis]))], hint)

    def unsqueeze(self, x: str, axis: int, hint: str) -> str:
        if self.opset >= 13:
            return self.one("Unsqueeze", [x, self.const("axes", np.array([axis]))], hint)
        return self.one("Unsqueeze", [x], hint, axes=[axis])

    def reduce_sum(self, x: str, axis: int, hint: str) -> str:
        if self.opset >= 13:
            return self.one("ReduceSum", [x, self.const("axes", np.array([axis]))], hint, keepdims=0)
        return self.one("ReduceSum", [x], hint, axes=[axis], keepdims=0)

    def dim(self, x: str, axis: int, hint: str) -> str:
        """Dimension ``axis`` of ``x`` as an INT64 scalar."""
        shape = self.one("Shape", [x], f"{hint}_shape")
        return self.one("Gather", [shape, self.const("axis", np.array(axis))], hint, axis=0)


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _raw_output(model: onnx.ModelProto, task: Task, src: Path) -> onnx.ValueInfoProto:
    wanted = task.roles.get("detections")
    outputs = list(model.graph.output)
    chosen = next((o for o in outputs if o.name == wanted), None) if wanted else (outputs[0] if outputs else None)
    if chosen is None:
        raise ConfigError(f"{src.name}: no output {wanted!r} to decode (outputs: {[o.name for o in outputs]})")
    rank = len(chosen.type.tensor_type.shape.dim)
    if rank != 3:
        raise ConfigError(f"{src.name}: the {task.layout} layout has one output of rank 3, {chosen.name!r} has rank "
                          f"{rank}")
    return chosen


def _boxes_and_scores(g: _Graph, raw: str, layout: str) -> tuple[str, str]:
    """``(boxes [b, anchors, 4] x1 y1 x2 y2, scores [b, classes, anchors])`` from the raw FP32 output."""
    if layout == "yolov8":  # [b, 4 + classes, anchors]
        cxcywh = g.one("Transpose", [g.slice(raw, 1, 0, 4, "cxcywh_t")], "cxcywh", perm=[0, 2, 1])
        scores = g.slice(raw, 1, 4, INT64_MAX, "scores")
    else:  # yolov5: [b, anchors, 5 + classes], a class's score is objectness × its class score
        cxcywh = g.slice(raw, 2, 0, 4, "cxcywh")
        weighted = g.one("Mul", [g.slice(raw, 2, 5, INT64_MAX, "class_scores"), g.slice(raw, 2, 4, 5, "objectness")],
                         "weighted")
        scores = g.one("Transpose", [weighted], "scores", perm=[0, 2, 1])
    centre, size = g.slice(cxcywh, 2, 0, 2, "centre"), g.slice(cxcywh, 2, 2, 4, "size")
    half = g.one("Mul", [size, g.const("half", np.array(0.5, dtype=np.float32))], "half_size")
    one, other = g.one("Sub", [centre, half], "corner"), g.one("Add", [centre, half], "corner")
    # corners in order (x1 <= x2, y1 <= y2), as decode puts them: an untrained head may predict negative sizes
    corners = [g.one("Min", [one, other], "top_left"), g.one("Max", [one, other], "bottom_right")]
    return g.one("Concat", corners, "boxes_xyxy", axis=2), scores


def _best_class_only(g: _Graph, scores: str) -> str:
    """``scores`` with every anchor's score kept in its best class alone (zero elsewhere), as decode ranks them: one
    detection per anchor, suppressed among boxes of the same class."""
    _, best = g.op("TopK", [scores, g.const("k", np.array([1]))], "best", outputs=2, axis=1)  # [b, 1, anchors]
    classes = g.one("Range", [g.const("zero", np.array(0)), g.dim(scores, 1, "num_classes"),
                              g.const("one", np.array(1))], "class_ids")
    column = g.one("Reshape", [classes, g.const("column", np.array([1, -1, 1]))], "class_column")
    is_best = g.one("Equal", [column, best], "is_best")  # [b, classes, anchors]
    zero = g.const("zero_score", np.array(0.0, dtype=np.float32))
    return g.one("Where", [is_best, scores, zero], "best_scores")


def _ranked(g: _Graph, scores: str, selected: str, batch: str, max_detections: int) -> tuple[str, str]:
    """The kept boxes' scores, best first, ``[b, max_detections]`` (zero past the last), and their flat
    ``anchor × classes + class`` index: the selected scores scattered into a zero tensor, ranked by TopK per image.
    ``batch`` is the batch size as a one-element INT64 tensor."""
    kept = g.one("GatherND", [scores, selected], "kept_scores")
    zeros = g.one("ConstantOfShape", [g.one("Shape", [scores], "scores_shape")], "zeros")
    dense = g.one("ScatterND", [zeros, selected, kept], "kept_dense")
    # anchor-major (anchor × classes + class), so equal scores rank by anchor, as decode's stable sort ranks them
    by_anchor = g.one("Transpose", [dense], "kept_by_anchor", perm=[0, 2, 1])
    flat = g.one("Reshape", [by_anchor, g.const("flat", np.array([0, -1]))], "kept_flat")
    # max_detections zero columns after the real ones: TopK's k never exceeds the row, however few anchors
    padding_shape = g.one("Concat", [batch, g.const("padding", np.array([max_detections]))], "padding_shape", axis=0)
    padding = g.one("ConstantOfShape", [padding_shape], "padding")
    padded = g.one("Concat", [flat, padding], "kept_padded", axis=1)
    top, index = g.op("TopK", [padded, g.const("k", np.array([max_detections]))], "ranked", outputs=2, axis=1)
    return top, index


def append_nms(src: Path, dst: Path, task: Task, *, max_detections: int = 100) -> Task:
    """Write ``src`` (a YOLOv8/v11 ``[b, 4 + classes, anchors]`` or YOLOv5 ``[b, anchors, 5 + classes]`` detector,
    as ``task`` says) to ``dst`` with decode and NMS appended (``task``'s score and IoU thresholds, at most
    ``max_detections`` per image), its outputs ``boxes``, ``scores``, ``classes`` and ``num_detections`` (see the
    module's docstring); returns the new task (the separate layout, its roles, the same thresholds).

    :class:`ConfigError` in one line for a task that is not a single-output YOLO layout, an opset below
    :data:`MIN_OPSET`, a raw output that is not of rank 3, or ``max_detections`` outside 1 to
    :data:`MAX_DETECTIONS`."""
    import onnx
    from onnx import TensorProto, helper

    src, dst = Path(src), Path(dst)
    if task.kind != "detection" or task.layout not in LAYOUTS:
        raise ConfigError(f"NMS is appended to the {' and '.join(LAYOUTS)} detection layouts, not to a "
                          f"{task.kind} task{f' of layout {task.layout}' if task.layout else ''}")
    if not 1 <= max_detections <= MAX_DETECTIONS:
        raise ConfigError(f"max_detections must be 1 to {MAX_DETECTIONS}, got {max_detections}")
    model = onnx.load(str(src))
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise ConfigError(f"{src.name} is opset {opset}; NonMaxSuppression needs {MIN_OPSET} or newer: import it "
                          f"through the intake (it upgrades the opset) or re-export it")
    raw_info = _raw_output(model, task, src)
    graph = model.graph
    taken = {n for node in graph.node for n in node.output} | {i.name for i in [*graph.input, *graph.initializer]}
    names = {role: role if role not in taken else f"{role}_nms" for role in OUTPUT_NAMES}
    g = _Graph(model, opset)
    raw = g.one("Cast", [raw_info.name], "raw", to=TensorProto.FLOAT)  # an FP16 head is suppressed in FP32
    boxes, scores = _boxes_and_scores(g, raw, str(task.layout))
    scores = _best_class_only(g, scores)
    limits = [g.const("max_per_class", np.array([max_detections])),
              g.const("iou_threshold", np.array([task.iou_threshold], dtype=np.float32)),
              g.const("score_threshold", np.array([task.score_threshold], dtype=np.float32))]
    selected = g.one("NonMaxSuppression", [boxes, scores, *limits], "selected", center_point_box=0)  # [n, 3]
    batch = g.slice(g.one("Shape", [raw], "raw_shape"), 0, 0, 1, "batch")
    top, index = _ranked(g, scores, selected, batch, max_detections)
    valid = g.one("Greater", [top, g.const("zero_score", np.array(0.0, dtype=np.float32))], "valid")
    classes = g.dim(scores, 1, "classes")
    anchor_or_padding = g.one("Div", [index, classes], "anchor_or_padding")
    klass = g.one("Sub", [index, g.one("Mul", [anchor_or_padding, classes], "anchor_offset")], "class_index")
    last_anchor = g.one("Sub", [g.dim(scores, 2, "anchors"), g.const("one", np.array(1))], "last_anchor")
    # padding rows point past the anchors: clamp them (Where, not Min: Min takes integers from opset 12 only)
    past = g.one("Greater", [anchor_or_padding, last_anchor], "past_anchors")
    anchor = g.one("Where", [past, last_anchor, anchor_or_padding], "anchor_index")
    gather_shape = g.one("Concat", [g.one("Shape", [anchor], "anchor_shape"), g.const("four", np.array([4]))],
                         "gather_shape", axis=0)
    gather_index = g.one("Expand", [g.unsqueeze(anchor, 2, "anchor_column"), gather_shape], "gather_index")
    picked = g.one("GatherElements", [boxes, gather_index], "picked_boxes", axis=1)
    valid_f = g.one("Cast", [valid], "valid_f", to=TensorProto.FLOAT)
    valid_i = g.one("Cast", [valid], "valid_i", to=TensorProto.INT64)
    model.graph.node.extend([
        helper.make_node("Mul", [picked, g.unsqueeze(valid_f, 2, "valid_column")], [names["boxes"]],
                         name=g.name("boxes")),
        helper.make_node("Mul", [top, valid_f], [names["scores"]], name=g.name("scores")),
        helper.make_node("Cast", [g.one("Mul", [klass, valid_i], "classes64")], [names["classes"]],
                         name=g.name("classes"), to=TensorProto.INT32),
        helper.make_node("Cast", [g.reduce_sum(valid_i, 1, "count64")], [names["num_detections"]],
                         name=g.name("num_detections"), to=TensorProto.INT32),
    ])
    first = raw_info.type.tensor_type.shape.dim[0]
    leading: str | int = first.dim_value if first.HasField("dim_value") else (first.dim_param or "batch")
    del model.graph.output[:]
    model.graph.output.extend([
        helper.make_tensor_value_info(names["boxes"], TensorProto.FLOAT, [leading, max_detections, 4]),
        helper.make_tensor_value_info(names["scores"], TensorProto.FLOAT, [leading, max_detections]),
        helper.make_tensor_value_info(names["classes"], TensorProto.INT32, [leading, max_detections]),
        helper.make_tensor_value_info(names["num_detections"], TensorProto.INT32, [leading]),
    ])
    _prune(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ConfigError(f"{src.name} with NMS appended is not a valid ONNX model: "
                          f"{str(exc).splitlines()[0][:200]}") from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return Task(kind="detection", layout="separate", roles=names, num_classes=task.num_classes,
                score_threshold=task.score_threshold, iou_threshold=task.iou_threshold)


def _prune(model: onnx.ModelProto) -> None:
    """Drop the nodes and initializers no output needs any more (the raw output's other consumers, if any)."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_outer_names(node))
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    initializers = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If, Loop, Scan) read, which may come from the outer graph."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(inner.input)
                names.update(_outer_names(inner))
    return names
