"""The device check's demo model: a small CNN written as ONNX in the three precisions a Jetson chooses between.

* ``fp32``: the network as trained (here: fixed random weights, He-initialised, so every run writes the same files);
* ``fp16``: the same weights in FP16 between a Cast in and a Cast out (a strongly typed TensorRT network runs it in
  FP16, as it would an FP16 export);
* ``int8-qdq``: explicit quantization as NVIDIA Model Optimizer exports it: per-channel INT8 weights
  (DequantizeLinear, axis 0 for Conv, axis 1 for the MatMul) and per-tensor INT8 activations (QuantizeLinear +
  DequantizeLinear before each Conv and the MatMul), scales from a calibration pass of the FP32 model. The ReLUs,
  pooling and the output stay FP32, which is where a strongly typed INT8 engine can lose to FP16.

Written with the ``onnx`` package (``pip install onnx``; the edge images do not carry it by default); the
validation set holds the FP32 model's outputs, so each engine is judged by top-1 agreement with FP32.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

INPUT_SHAPE = (3, 64, 64)
LAYERS = ((32, 3, 1), (64, 32, 2), (128, 64, 2))
"""(out channels, in channels, stride) of each 3x3 Conv."""
CLASSES = 10
VARIANTS = {"fp32": ("fp32", ["tensorrt", "onnxruntime"]), "fp16": ("fp16", ["tensorrt", "onnxruntime"]),
            "int8-qdq": ("int8", ["tensorrt"])}
"""Variant name → (precision, backends it is for)."""


@dataclass(frozen=True)
class DemoModel:
    """The written files and the unsigned manifest that describes them."""

    folder: Path
    manifest: Any  # edgeloop_core.contract.Manifest
    files: dict[str, Path]
    validation: Path


def _weights(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    convs = [(rng.standard_normal((o, i, 3, 3)) * np.sqrt(2.0 / (i * 9))).astype(np.float32) for o, i, _ in LAYERS]
    return convs, (rng.standard_normal((LAYERS[-1][0], CLASSES)) * np.sqrt(1.0 / LAYERS[-1][0])).astype(np.float32)


class _Graph:
    """Nodes and initializers of one precision's graph."""

    def __init__(self, precision: str, act_scales: list[float] | None) -> None:
        self.precision, self.act_scales = precision, act_scales
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:  # noqa: ANN401
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))

    def init(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def activation(self, name: str, index: int) -> str:
        """``name`` through Q/DQ with its calibrated scale (INT8), else as it is."""
        if self.precision != "int8" or self.act_scales is None:
            return name
        scale = self.init(f"{name}/scale", np.array(self.act_scales[index], np.float32))
        zero = self.init(f"{name}/zero", np.array(0, np.int8))
        self.node("QuantizeLinear", [name, scale, zero], [f"{name}/q"])
        self.node("DequantizeLinear", [f"{name}/q", scale, zero], [f"{name}/dq"])
        return f"{name}/dq"

    def weight(self, name: str, value: np.ndarray, axis: int) -> str:
        """A weight in this precision: FP32, FP16, or INT8 per channel along ``axis`` behind a DequantizeLinear."""
        if self.precision == "fp16":
            return self.init(name, value.astype(np.float16))
        if self.precision != "int8":
            return self.init(name, value)
        reduce = tuple(a for a in range(value.ndim) if a != axis)
        scale = np.maximum(np.abs(value).max(axis=reduce) / 127.0, 1e-8).astype(np.float32)
        shape = [1] * value.ndim
        shape[axis] = -1
        quantized = np.clip(np.round(value / scale.reshape(shape)), -127, 127).astype(np.int8)
        self.node("DequantizeLinear", [self.init(f"{name}/q", quantized), self.init(f"{name}/scale", scale),
                                       self.init(f"{name}/zero", np.zeros(len(scale), np.int8))], [name], axis=axis)
        return name


def demo_onnx(precision: str, act_scales: list[float] | None = None, *, probes: bool = False) -> bytes:
    """The demo CNN in ``precision`` (fp32, fp16 or int8) as ONNX bytes (opset 17). ``probes`` adds the activations
    that INT8 quantizes as extra outputs (the calibration pass)."""
    import onnx
    from onnx import TensorProto, helper

    convs, fc = _weights()
    graph, x, probed = _Graph(precision, act_scales), "input", []
    if precision == "fp16":
        graph.node("Cast", ["input"], ["input/fp16"], to=TensorProto.FLOAT16)
        x = "input/fp16"
    for i, ((_, _, stride), weight) in enumerate(zip(LAYERS, convs, strict=True)):
        probed.append(x)
        graph.node("Conv", [graph.activation(x, i), graph.weight(f"conv{i}/w", weight, 0)], [f"conv{i}"],
                   pads=[1, 1, 1, 1], strides=[stride, stride])
        graph.node("Relu", [f"conv{i}"], [f"relu{i}"])
        x = f"relu{i}"
    graph.node("GlobalAveragePool", [x], ["pool"])
    graph.node("Flatten", ["pool"], ["features"])
    probed.append("features")
    logits = "logits/fp16" if precision == "fp16" else "logits"
    graph.node("MatMul", [graph.activation("features", len(LAYERS)), graph.weight("fc/w", fc, 1)], [logits])
    if precision == "fp16":
        graph.node("Cast", [logits], ["logits"], to=TensorProto.FLOAT)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])]
    if probes:
        outputs += [helper.make_tensor_value_info(p, TensorProto.FLOAT, ["N", "C"] if p == "features" else
                                                  ["N", "C", "H", "W"]) for p in probed]
    model = helper.make_model(
        helper.make_graph(graph.nodes, f"edgeloop-selfcheck-{precision}",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
                          outputs, graph.inits),
        opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeloop-selfcheck")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_demo_model(folder: Path, samples: int = 64) -> DemoModel:
    """Write the three variants, a validation set (inputs and the FP32 outputs) and the manifest into ``folder``."""
    import onnxruntime as ort

    from edgeloop_core.contract import Manifest, TensorSpec, Validation, Variant, sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(1).standard_normal((samples, *INPUT_SHAPE)).astype(np.float32)
    calibration = ort.InferenceSession(demo_onnx("fp32", probes=True), providers=["CPUExecutionProvider"])
    reference, *activations = calibration.run(None, {"input": x})
    scales = [max(float(np.abs(a).max()) / 127.0, 1e-8) for a in activations]
    files = {}
    for name, (precision, _) in VARIANTS.items():
        files[name] = folder / f"{name}.onnx"
        files[name].write_bytes(demo_onnx(precision, scales))
    validation = folder / "validation.npz"
    np.savez(validation, inputs=x, **{"reference:logits": reference})
    variants = []
    for name, (precision, backends) in VARIANTS.items():
        digest, size = sha256_file(files[name])
        variants.append(Variant(file=files[name].name, sha256=digest, size_bytes=size, name=name,
                                precision=precision, backends=backends,  # type: ignore[arg-type]
                                quantization="modelopt-qdq" if precision == "int8" else "none"))
    digest, size = sha256_file(validation)
    manifest = Manifest(
        name="selfcheck-cnn", version="v1", created_at=datetime.now(timezone.utc),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, *INPUT_SHAPE])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, CLASSES])],
        labels=[str(i) for i in range(CLASSES)], variants=variants,
        validation=Validation(file=validation.name, sha256=digest, size_bytes=size, num_samples=samples,
                              metric="top1_agreement", reference=dict.fromkeys(VARIANTS, 1.0), tolerance=0.1))
    return DemoModel(folder, manifest, files, validation)
