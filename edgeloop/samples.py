"""Small real models the project generates itself (no download), for the demo's second model and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def gemm_classifier(path: Path, layers: list[tuple[np.ndarray, np.ndarray]], *,
                    input_shape: tuple[int, ...] = (1, 8, 8), classes: int = 10) -> Path:
    """Write an ONNX classifier: ``input`` (N, *input_shape) → Flatten → Gemm layers with Relu between → ``logits``
    (N, classes). ``layers`` are (weight (in, out), bias (out,)) pairs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Flatten", ["input"], ["x0"], axis=1)]
    initializers = []
    for i, (weight, bias) in enumerate(layers):
        initializers += [numpy_helper.from_array(np.asarray(weight, np.float32), f"w{i}"),
                         numpy_helper.from_array(np.asarray(bias, np.float32), f"b{i}")]
        out = "logits" if i == len(layers) - 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [f"x{i}", f"w{i}", f"b{i}"], [out]))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"x{i + 1}"]))
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def digits_linear(folder: Path, calibration_samples: int = 512) -> tuple[Path, Path]:
    """A logistic regression trained on scikit-learn's digits (pixels scaled to [0, 1]) as ONNX, and a calibration
    set for importing it (``calibration.npz``: one array per model input, here ``input``, float32 in [0, 1])."""
    from sklearn.linear_model import LogisticRegression

    from components.data import load_digits_dataset

    data = load_digits_dataset()
    fit = LogisticRegression(max_iter=1000).fit(data.x_train.reshape(len(data.x_train), -1), data.y_train)
    onnx_path = gemm_classifier(Path(folder) / "digits-linear.onnx", [(fit.coef_.T, fit.intercept_)])
    calibration = Path(folder) / "calibration.npz"
    np.savez(calibration, input=data.x_train[:calibration_samples].astype(np.float32))
    return onnx_path, calibration
