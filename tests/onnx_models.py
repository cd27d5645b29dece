"""Small ONNX models the tests build with ``onnx.helper``: types and shapes torch does not export, and graphs whose
one operator is the point of a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(path: Path, nodes: list, inputs: list, outputs: list, initializers: list | None = None) -> Path:
    """One graph at opset 17 (IR 8, which every ONNX Runtime here reads), saved to ``path``."""
    graph = helper.make_graph(nodes, Path(path).stem, inputs, outputs, initializers or [])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return Path(path)


def elementwise_model(path: Path, op: str, elem_type: int, shape: list) -> Path:
    """``y = op(x)`` for a one-input operator (Relu, Not, Neg, ...), ``x`` and ``y`` of ``elem_type`` and ``shape``."""
    return save(path, [helper.make_node(op, ["x"], ["y"])], [helper.make_tensor_value_info("x", elem_type, shape)],
                [helper.make_tensor_value_info("y", elem_type, shape)])


def embedding_model(path: Path, table: np.ndarray) -> Path:
    """INT64 ``ids`` [batch, 3] → ``vectors`` [batch, 3, width] rows of ``table``: an id outside it is refused by
    ONNX Runtime at run time, after every check on names, types and shapes passed."""
    return save(path, [helper.make_node("Gather", ["table", "ids"], ["vectors"])],
                [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 3])],
                [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["b", 3, table.shape[1]])],
                [numpy_helper.from_array(table, "table")])


def sensor_model(path: Path) -> Path:
    """A raw 12-bit sensor frame (UINT16) and a per-frame INT16 offset → FP32 scores, and the winning class as UINT32
    and as UINT64: the integer types a camera or a counter hands over (torch exports no unsigned 16/32/64-bit
    inputs)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
               numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc"),
               numpy_helper.from_array(np.array(1 / 4096, np.float32), "scale")]
    nodes = [helper.make_node("Cast", ["raw"], ["raw_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["raw_f", "scale"], ["x"]),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["m"]),
             helper.make_node("Cast", ["offset"], ["offset_f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["m", "offset_f"], ["scores"]),
             helper.make_node("ArgMax", ["scores"], ["best"], axis=1, keepdims=0),
             helper.make_node("Cast", ["best"], ["label"], to=TensorProto.UINT32),
             helper.make_node("Cast", ["best"], ["label64"], to=TensorProto.UINT64)]
    return save(path, nodes, [helper.make_tensor_value_info("raw", TensorProto.UINT16, ["batch", 1, 8, 8]),
                              helper.make_tensor_value_info("offset", TensorProto.INT16, ["batch", 1])],
                [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4]),
                 helper.make_tensor_value_info("label", TensorProto.UINT32, ["batch"]),
                 helper.make_tensor_value_info("label64", TensorProto.UINT64, ["batch"])], weights)
