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

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.detector import OUTPUT_NAME, detection_task
from components.export import INPUT_NAME, OPSET, VariantInfo, export_variants, run_onnx
from edgeloop_core.contract import TensorSpec
from edgeloop_core.errors import ContractError

BOUNDS: dict[str, tuple[float, float | None]] = {
    "fp32-dense": (0.99, 1e-3), "fp32": (0.99, 1e-3), "fp16": (0.98, None), "int8-qdq": (0.9, None),
    "int8-ort": (0.9, None)}
"""Per variant: the least detection F1 against its own PyTorch model (IoU 0.5, the task's score threshold), and the
largest output difference (pixels for boxes, 0..1 for scores) the FP32 exports may show."""


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


def _check(path: Path, reference: np.ndarray, x: np.ndarray, floor: float,
           max_abs_diff: float | None) -> tuple[float, float]:
    return check_detector(path, reference, x, min_f1=floor, max_abs_diff=max_abs_diff)


def export_detector_variants(
    dense: nn.Module,
    pruned: nn.Module,
    quantized: nn.Module,
    *,
    x_check: np.ndarray,
    x_calibration: np.ndarray,
    out_dir: str | Path,
) -> list[VariantInfo]:
    """Export every variant of the detector into ``out_dir`` (``<variant>.onnx``) and write ``variants.json``:
    :func:`components.export.export_variants` with the detector's exporter, check and bounds, and ONNX Runtime's
    INT8 keeping the decode in floating point."""
    return export_variants(dense, pruned, quantized, x_check=x_check, x_calibration=x_calibration, out_dir=out_dir,
                           export=export_detector_onnx, check=_check, bounds=BOUNDS, float_head=True)
