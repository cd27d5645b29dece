"""Export the pipeline's detector (:mod:`components.detector`) to every variant of :data:`components.export.VARIANTS`.

The same variants, files and ``variants.json`` as :func:`components.export.export_variants`, with what a detector
needs instead of a classifier's checks:

* the one output is ``detections`` (``[batch, 4 + classes, anchors]``, the YOLOv8 layout), batch axis dynamic;
* each file is compared with its PyTorch model by the detector's task: boxes and scores each on their own (a
  collapsed slice, such as scores INT8 flattened to zero, fails the export), and the F1 of the detections
  (decoded, NMS) matched at IoU 0.5 — recorded in ``VariantInfo.top1_agreement``, the field the export keeps for
  agreement with PyTorch;
* ONNX Runtime's INT8 quantizer leaves the in-graph decode in floating point (``float_head``: every node after the
  last convolutions, which are the decode's ``/decode/...`` nodes: softplus, sigmoid, the anchor-point arithmetic
  and the Concat that joins boxes in pixels with scores in 0..1). Model Optimizer's QAT puts quantizers on the
  convolutions' inputs and weights only (this detector has no other quantizable layer), so the ``int8-qdq`` export
  keeps the decode in floating point as it is.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.detector import OUTPUT_NAME, detection_task
from components.export import INPUT_NAME, OPSET, VariantInfo, convert_fp16, quantize_ort_int8, run_onnx
from edgeloop_core.contract import TensorSpec
from edgeloop_core.errors import ContractError

MIN_F1 = {"fp32-dense": 0.99, "fp32": 0.99, "fp16": 0.98, "int8-qdq": 0.9, "int8-ort": 0.9}
"""Least detection F1 against the variant's own PyTorch model (IoU 0.5, the task's score threshold)."""
MAX_ABS_DIFF = {"fp32-dense": 1e-3, "fp32": 1e-3}
"""Largest output difference from PyTorch (pixels for boxes, 0..1 for scores) the FP32 exports may show."""


def export_detector_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> Path:
    """TorchScript-based ONNX export (``dynamo=False``, as Model Optimizer's Q/DQ export needs), dynamic batch, the
    output named :data:`~components.detector.OUTPUT_NAME`."""
    import onnx

    path = Path(path)
    model.cpu().eval()
    dummy = torch.zeros(2, *input_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        shape = model(dummy).shape
    # the exporter names every axis of the decode's Reshape symbolically; all but the batch are fixed: say so
    exported = onnx.load(str(path))
    for axis, dim in enumerate(exported.graph.output[0].type.tensor_type.shape.dim):
        if axis > 0:
            dim.dim_value = int(shape[axis])
    onnx.save(exported, str(path))
    return path


def output_spec(path: str | Path) -> TensorSpec:
    """The exported detector's one output as a manifest declares it: ``detections``, FP32,
    ``[-1, 4 + classes, anchors]``."""
    import onnx

    output = onnx.load(str(path), load_external_data=False).graph.output[0]
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in output.type.tensor_type.shape.dim]
    return TensorSpec(name=output.name, datatype="FP32", shape=shape)


def check_detector(path: str | Path, reference: np.ndarray, x: np.ndarray, *, min_f1: float,
                   max_abs_diff: float | None) -> tuple[float, float]:
    """``onnx.checker`` the file, run it on ``x`` and compare with the PyTorch outputs ``reference``: no box or
    score slice may collapse, the detections' F1 must reach ``min_f1`` and (when given) no value may differ by more
    than ``max_abs_diff``. Returns ``(max |diff|, F1)``; raises :class:`ContractError` naming what failed."""
    import onnx

    from edgeloop_core.detection import decode, detection_f1
    from edgeloop_core.quality import tensor_agreement

    onnx.checker.check_model(str(path), full_check=True)
    got = run_onnx(path, x)
    name = Path(path).name
    task = detection_task(reference.shape[1] - 4)
    collapsed = [p for p in tensor_agreement({OUTPUT_NAME: reference}, {OUTPUT_NAME: got}, task.slices).parts
                 if p.collapsed]
    if collapsed:
        raise ContractError(f"{name}: {collapsed[0].part} {collapsed[0].reason} (PyTorch's do not)")
    diff = float(np.abs(got - reference).max())
    f1 = detection_f1(decode({OUTPUT_NAME: reference}, task), decode({OUTPUT_NAME: got}, task))
    if max_abs_diff is not None and diff > max_abs_diff:
        raise ContractError(f"{name}: ONNX output differs from PyTorch by {diff:.3g} (> {max_abs_diff})")
    if f1 < min_f1:
        raise ContractError(f"{name}: detection F1 against PyTorch {f1:.3f} < {min_f1}")
    return diff, f1


def export_detector_variants(
    dense: nn.Module,
    pruned: nn.Module,
    quantized: nn.Module,
    *,
    x_check: np.ndarray,
    x_calibration: np.ndarray,
    out_dir: str | Path,
) -> list[VariantInfo]:
    """Export every variant of the detector into ``out_dir`` (``<variant>.onnx``) and write ``variants.json``."""
    from components.models import count_flops, count_params
    from components.train import predict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(x_check.shape[1:])
    dense_flops, pruned_flops = count_flops(dense, shape), count_flops(pruned, shape)
    references = {"dense": predict(dense, x_check), "pruned": predict(pruned, x_check),
                  "quantized": predict(quantized, x_check)}
    infos: list[VariantInfo] = []

    def add(name: str, precision: str, quantization: str, backends: tuple[str, ...], model: nn.Module,
            reference: str) -> None:
        path = out / f"{name}.onnx"
        diff, f1 = check_detector(path, references[reference], x_check, min_f1=MIN_F1[name],
                                  max_abs_diff=MAX_ABS_DIFF.get(name))
        infos.append(VariantInfo(name, path.name, precision, quantization, backends, reference != "dense",
                                 count_params(model), dense_flops if reference == "dense" else pruned_flops, diff,
                                 f1))

    both = ("tensorrt", "onnxruntime")
    export_detector_onnx(dense, out / "fp32-dense.onnx", shape)
    add("fp32-dense", "fp32", "none", both, dense, "dense")
    export_detector_onnx(pruned, out / "fp32.onnx", shape)
    add("fp32", "fp32", "none", both, pruned, "pruned")
    convert_fp16(out / "fp32.onnx", out / "fp16.onnx")
    add("fp16", "fp16", "none", both, pruned, "pruned")
    export_detector_onnx(quantized, out / "int8-qdq.onnx", shape)
    add("int8-qdq", "int8", "modelopt-qdq", ("tensorrt",), quantized, "quantized")
    quantize_ort_int8(out / "fp32.onnx", out / "int8-ort.onnx", x_calibration, float_head=True)
    add("int8-ort", "int8", "ort-qdq", ("onnxruntime",), pruned, "pruned")
    (out / "variants.json").write_text(json.dumps([asdict(i) for i in infos], indent=2))
    return infos
