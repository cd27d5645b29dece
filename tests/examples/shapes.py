"""A video of moving coloured shapes, a detector whose boxes follow a simple rule on it, and a way to publish it.

The detector (built with ``onnx.helper``, YOLOv8 layout ``[batch, 4 + 3, 100]``): the 320×320 RGB input is cut into
a 10×10 grid of 32-pixel cells; each cell is one anchor whose box is the cell itself and whose score for class c is
the mean of channel c over the cell (red, green, blue in [0, 1]). On a black frame a red square is therefore
"detected" as class 0 in every cell it covers by more than the score threshold, and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from examples.publish_onnx import publish_onnx_as_is

SIZE = 320
CELL = 32
GRID = SIZE // CELL
CLASSES = ("red", "green", "blue")
SHAPE_BGR = ((0, 0, 255), (0, 255, 0), (255, 0, 0))
"""The shapes' colours as OpenCV writes them (BGR), in class order."""


def shapes_detector(path: Path) -> Path:
    """The rule-based detector (see the module docstring), input ``images`` ``[batch, 3, 320, 320]`` FP32, output
    ``output0`` ``[batch, 7, 100]``, opset 17, dynamic batch."""
    centres = (np.arange(GRID, dtype=np.float32) + 0.5) * CELL
    cy, cx = np.meshgrid(centres, centres, indexing="ij")  # row-major cells: anchor = row * GRID + column
    boxes = np.stack([cx.ravel(), cy.ravel(), np.full(GRID * GRID, CELL, np.float32),
                      np.full(GRID * GRID, CELL, np.float32)])[None].astype(np.float32)  # [1, 4, anchors]
    nodes = [
        helper.make_node("AveragePool", ["images"], ["cells"], kernel_shape=[CELL, CELL], strides=[CELL, CELL]),
        helper.make_node("Reshape", ["cells", "score_shape"], ["scores"]),
        helper.make_node("Shape", ["images"], ["image_shape"]),
        helper.make_node("Slice", ["image_shape", "zero", "one", "zero"], ["batch"]),
        helper.make_node("Concat", ["batch", "box_dims"], ["box_shape"], axis=0),
        helper.make_node("Expand", ["boxes", "box_shape"], ["batch_boxes"]),
        helper.make_node("Concat", ["batch_boxes", "scores"], ["output0"], axis=1),
    ]
    initializers = [numpy_helper.from_array(boxes, "boxes"),
                    numpy_helper.from_array(np.array([0, len(CLASSES), GRID * GRID]), "score_shape"),
                    numpy_helper.from_array(np.array([0]), "zero"), numpy_helper.from_array(np.array([1]), "one"),
                    numpy_helper.from_array(np.array([4, GRID * GRID]), "box_dims")]
    graph = helper.make_graph(
        nodes, "shapes", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + len(CLASSES), GRID * GRID])],
        initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def shape_positions(index: int, frames: int) -> list[tuple[int, int, int, int]]:
    """Where each shape is in frame ``index``: x1, y1, x2, y2 of the red square, the green square and the blue
    rectangle, moving across the frame over ``frames`` frames."""
    t = index / max(1, frames - 1)
    red_x, green_y, blue = int(10 + t * 230), int(10 + t * 230), int(20 + t * 150)
    return [(red_x, 40, red_x + 70, 110), (200, green_y, 270, green_y + 70), (blue, blue + 60, blue + 90, blue + 120)]


def write_video(path: Path, frames: int = 60, size: tuple[int, int] = (SIZE, SIZE), fps: float = 30.0) -> Path:
    """A video of ``frames`` frames (``size`` width × height) of filled shapes moving over black, mp4v."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for index in range(frames):
        frame = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        for (x1, y1, x2, y2), colour in zip(shape_positions(index, frames), SHAPE_BGR, strict=True):
            cv2.rectangle(frame, (x1, y1), (x2, y2), colour, thickness=-1)
        writer.write(frame)
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    """Every frame of a video (BGR), read by the example client's own reader."""
    from examples.video_client import open_video, read_frames

    capture, _, _ = open_video(path)
    try:
        return list(read_frames(capture))
    finally:
        capture.release()


def publish_detector(store, signing_key, onnx_path: Path, name: str, task, inputs: np.ndarray):
    """Publish ``onnx_path`` as the one FP32 variant of ``name`` (version v1, channel stable), validated on the
    device by detection F1 against its own outputs on ``inputs``; returns the signed manifest."""
    return publish_onnx_as_is(store, signing_key, onnx_path, name, task, {"images": inputs}, work=onnx_path.parent,
                              labels=list(CLASSES))
