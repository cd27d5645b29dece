"""Export every variant to ONNX with a dynamic batch axis, check it, and compare it with PyTorch.

Variants (see ``VARIANTS``):

* ``fp32-dense``  the unpruned FP32 baseline (kept for comparison and as a fallback);
* ``fp32``        the pruned model;
* ``fp16``        the pruned model with FP16 weights and math (inputs/outputs stay FP32);
* ``int8-qdq``    the QAT model as QuantizeLinear/DequantizeLinear pairs, for TensorRT;
* ``int8-ort``    the pruned model quantized by ONNX Runtime's static quantizer (QDQ, per-channel), for CPUs,
                  whose kernels ONNX Runtime fuses into real INT8 (it does not fuse Model Optimizer's graph).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeloop_core.errors import ContractError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


@dataclass(frozen=True)
class VariantInfo:
    """What the exporter knows about one variant; the manifest's ``Variant`` is built from it."""

    name: str
    file: str
    precision: str
    quantization: str
    backends: tuple[str, ...]
    pruned: bool
    params: int
    flops: int
    max_abs_diff: float
    top1_agreement: float


VARIANTS = ("fp32-dense", "fp32", "fp16", "int8-qdq", "int8-ort")


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> Path:
    """TorchScript-based ONNX export (``dynamo=False``, which Model Optimizer's Q/DQ export needs), dynamic batch."""
    path = Path(path)
    model.cpu().eval()  # export on the CPU: the ONNX file is the same, and the step may have no GPU
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
    return path


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and math; FP32 inputs and outputs so clients need not change."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
    converted.topological_sort()  # the converter appends its input casts after their consumers
    onnx.save(converted.model, str(dst))
    return Path(dst)


class _Calibration:
    """ONNX Runtime calibration reader over a numpy array (the ``input`` tensor) or arrays by input name."""

    def __init__(self, x: np.ndarray | dict[str, np.ndarray], batch: int = 32) -> None:
        inputs = x if isinstance(x, dict) else {INPUT_NAME: x}
        count = len(next(iter(inputs.values())))
        self._starts = list(range(0, count, batch))
        self._inputs, self._batch, self._done = inputs, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._done >= len(self._starts):
            return None
        start = self._starts[self._done]
        self._done += 1
        if self._done in {len(self._starts) * q // 4 for q in (1, 2, 3, 4)}:
            print(f"calibration: {self._done}/{len(self._starts)} batches of {self._batch}", flush=True)
        return {k: v[start : start + self._batch] for k, v in self._inputs.items()}


QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Clip",
                      "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Gather")
"""What the CPU INT8 variant quantizes: the weight-bearing ops, which INT8 kernels (VNNI) make faster, and the
pooling and data-movement ops between them, which ONNX Runtime runs on INT8 tensors as they are (no requantization,
so a tensor stays INT8 from one convolution to the next)."""


def activation_matmuls(model_path: str | Path) -> list[str]:
    """Names of the ``MatMul`` nodes with no constant operand (attention's ``Q·Kᵀ`` and ``softmax·V``).

    Quantizing them puts QuantizeLinear/DequantizeLinear around Softmax and the attention products, which ONNX
    Runtime runs as QLinearSoftmax and per-call requantization: slower than FP32 on a CPU (measured on the audio
    spectrogram transformer: 4.1 ms against 2.7 ms at batch 16), and no gain in accuracy or size.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and not any(name in constants for name in node.input)]


HEAD_BOUNDARY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
"""The weight-bearing ops whose outputs a detector's head starts from (see :func:`detector_head_nodes`)."""


def name_nodes(model_path: str | Path) -> Path:
    """Give every unnamed node of the ONNX file at ``model_path`` a unique name (``<op>_edgeloop_<index>``), in place.

    Both quantizers pick nodes to leave alone by name, and exporters (``onnx.helper`` graphs, some converters) may
    leave names empty; the file is rewritten only when a node had none."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)  # saved back in place: external data stays valid
    taken = {node.name for node in model.graph.node}
    unnamed = [node for node in model.graph.node if not node.name]
    for index, node in enumerate(unnamed):
        name = f"{node.op_type}_edgeloop_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    if unnamed:
        onnx.save(model, str(model_path))
    return Path(model_path)


def detector_head_nodes(model_path: str | Path) -> list[str]:
    """Names of the nodes between the last weight-bearing op (:data:`HEAD_BOUNDARY_OPS`) on each path and the
    model's outputs, in graph order: a detector's decode and concat head (the grid and stride arithmetic, Sigmoid,
    the Concat/Split of boxes and scores, their Reshape/Transpose, an appended NMS).

    That head joins quantities of different scales in one tensor — YOLOv8 concatenates box coordinates in pixels
    (hundreds) with class scores in [0, 1] — so one INT8 scale over it rounds every score to 0. Both quantizers are
    told to leave these nodes in floating point; the convolutions before them keep their own (per-tensor) scales.
    Unnamed nodes are not listed: run :func:`name_nodes` on the file first."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {output: index for index, node in enumerate(graph.node) for output in node.output if output}
    head: set[int] = set()
    seen: set[str] = set()
    pending = [output.name for output in graph.output]
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor not in producer:
            continue
        seen.add(tensor)
        node = graph.node[producer[tensor]]
        if node.op_type not in HEAD_BOUNDARY_OPS:
            head.add(producer[tensor])
            pending.extend(name for name in node.input if name)
    return [graph.node[index].name for index in sorted(head) if graph.node[index].name]


def quantize_ort_int8(src: str | Path, dst: str | Path, calibration: np.ndarray | dict[str, np.ndarray], *,
                      batch: int = 32, float_head: bool = False) -> Path:
    """ONNX Runtime static quantization for CPUs: QDQ format, per-channel INT8 weights, UINT8 activations (MinMax).

    Only the weight-bearing ops and the pooling/data-movement ops between them (:data:`QUANTIZED_OP_TYPES`) are
    quantized, and of the MatMuls only those with a constant operand (:func:`activation_matmuls`): ONNX Runtime
    fuses each Q/DQ-wrapped Conv/MatMul into an INT8 kernel, while quantized element-wise ops (Add, Mul,
    LayerNorm), Softmax and activation-by-activation products only add requantization work on a CPU. Whether the
    result is faster than FP32 on a given model is measured by the evaluation step (``min_speedup``) and again on
    each device before it serves.

    ``float_head``: leave the nodes after the last convolution on each path (:func:`detector_head_nodes`) in
    floating point — for detectors, whose head mixes box coordinates and class scores in one tensor.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    prepared = dst.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        excluded = activation_matmuls(prepared)
        if float_head:
            excluded += detector_head_nodes(name_nodes(prepared))
        quantize_static(
            str(prepared),
            str(dst),
            _Calibration(calibration, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            nodes_to_exclude=excluded,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return dst


@contextmanager
def onnxruntime_quantization_restored() -> Iterator[None]:
    """Put ONNX Runtime's quantization package back as it was on leaving: every module attribute, class attribute
    and table entry (its op registries) of ``onnxruntime.quantization.*``.

    Model Optimizer's ONNX quantizer reconfigures that package for the whole process (it edits the op registries and
    replaces the calibrators' methods); a later ``quantize_static`` in the same process (:func:`quantize_ort_int8`)
    then quantizes differently, or fails ("Quantization parameters are not specified for param ...")."""
    import sys

    import onnxruntime.quantization  # noqa: F401 - loads the modules whose state is kept

    modules = [module for name, module in list(sys.modules.items())
               if name.startswith("onnxruntime.quantization") and module is not None]
    attributes = {module: dict(vars(module)) for module in modules}
    tables = [(value, dict(value)) for module in modules for key, value in vars(module).items()
              if isinstance(value, dict) and not key.startswith("__")]
    classes = {value: dict(vars(value)) for module in modules for value in vars(module).values()
               if isinstance(value, type) and value.__module__.startswith("onnxruntime.quantization")}
    try:
        yield
    finally:
        for owner, saved in [*attributes.items(), *classes.items()]:
            for key in [k for k in vars(owner) if k not in saved and not k.startswith("__")]:
                delattr(owner, key)
            for key, value in saved.items():
                if key not in ("__dict__", "__weakref__") and vars(owner).get(key) is not value:
                    setattr(owner, key, value)
        for table, content in tables:
            table.clear()
            table.update(content)


def quantize_modelopt_int8(src: str | Path, dst: str | Path, calibration: dict[str, np.ndarray], *,
                           float_head: bool = False) -> Path:
    """Post-training INT8 Q/DQ for TensorRT with Model Optimizer's ONNX quantizer, calibrated on the CPU (max).

    ``float_head``: leave the nodes after the last convolution on each path (:func:`detector_head_nodes`) in
    floating point. Model Optimizer leaves a YOLO decode head alone by itself, but not every head: it quantizes the
    MaxPool of a CenterNet-style peak search, and then the peaks are found among rounded scores."""
    import re
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeloop-modelopt-") as tmp:
        # Model Optimizer works on (and next to) its input: give it a copy, and copies of the calibration arrays
        work = Path(tmp) / "model.onnx"
        shutil.copyfile(src, work)
        # its nodes_to_exclude are regular expressions (re.match): each head node's exact name
        head = [re.escape(name) + "$" for name in detector_head_nodes(name_nodes(work))] if float_head else []
        with onnxruntime_quantization_restored():
            from modelopt.onnx.quantization import quantize

            quantize(str(work), quantize_mode="int8",
                     calibration_data={k: v.copy() for k, v in calibration.items()},
                     calibration_method="max", calibration_eps=["cpu"], high_precision_dtype="fp32",
                     nodes_to_exclude=head or None, output_path=str(dst))
    return Path(dst)


CALIBRATION_FILE = "calibration.json"


def save_calibration_info(out_dir: str | Path, *, samples: int, seed: int, histogram: dict[str, int]) -> Path:
    """Record next to the variants what the INT8 calibration saw (size, seed, rows per class) for the report."""
    path = Path(out_dir) / CALIBRATION_FILE
    path.write_text(json.dumps({"samples": samples, "seed": seed, "histogram": histogram}, indent=2))
    return path


def run_onnx(path: str | Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Outputs of an ONNX model on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(None, {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    )


def check_against_torch(
    path: str | Path, reference: np.ndarray, x: np.ndarray, *, min_agreement: float, max_abs_diff: float | None
) -> tuple[float, float]:
    """``onnx.checker`` the file, run it, and compare with the PyTorch logits ``reference`` of ``x``.

    Returns ``(max |diff|, top-1 agreement)``; raises :class:`ContractError` when a bound is not met.
    """
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    got = run_onnx(path, x)
    diff = float(np.abs(got - reference).max())
    agreement = float((got.argmax(1) == reference.argmax(1)).mean())
    name = Path(path).name
    if max_abs_diff is not None and diff > max_abs_diff:
        raise ContractError(f"{name}: ONNX output differs from PyTorch by {diff:.3g} (> {max_abs_diff})")
    if agreement < min_agreement:
        raise ContractError(f"{name}: top-1 agreement with PyTorch {agreement:.3f} < {min_agreement}")
    return diff, agreement


CHECK_MIN_SAMPLES = 256
"""Fewest inputs the ONNX-vs-PyTorch agreement is measured on: on a 30-clip test set (the keyword-spotting data) one
flipped answer is 3.3 points, so a 95-98% bound would judge noise, not the export."""


def check_inputs(x_test: np.ndarray, x_val: np.ndarray, x_train: np.ndarray,
                 minimum: int = CHECK_MIN_SAMPLES) -> np.ndarray:
    """The inputs a classifier's export is checked on: the test set, topped up to ``minimum`` rows with validation and
    then training inputs (a test set of ``minimum`` or more is used alone, as before)."""
    if len(x_test) >= minimum:
        return x_test
    extra = np.concatenate([x_val, x_train[: max(0, minimum - len(x_test) - len(x_val))]])
    return np.concatenate([x_test, extra[: minimum - len(x_test)]])


CLASSIFIER_BOUNDS: dict[str, tuple[float, float | None]] = {
    "fp32-dense": (1.0, 1e-3), "fp32": (1.0, 1e-3), "fp16": (0.99, 5e-2), "int8-qdq": (0.98, None),
    "int8-ort": (0.95, None)}
"""Per variant: the least top-1 agreement with its PyTorch model, and the largest output difference (or none)."""
Exporter = Callable[[nn.Module, Path, tuple[int, ...]], Path]
Check = Callable[[Path, np.ndarray, np.ndarray, float, "float | None"], tuple[float, float]]


def _check_classifier(path: Path, reference: np.ndarray, x: np.ndarray, floor: float,
                      max_abs_diff: float | None) -> tuple[float, float]:
    return check_against_torch(path, reference, x, min_agreement=floor, max_abs_diff=max_abs_diff)


def export_variants(
    dense: nn.Module,
    pruned: nn.Module,
    quantized: nn.Module,
    *,
    x_check: np.ndarray,
    x_calibration: np.ndarray,
    out_dir: str | Path,
    export: Exporter = export_onnx,
    check: Check = _check_classifier,
    bounds: dict[str, tuple[float, float | None]] = CLASSIFIER_BOUNDS,
    float_head: bool = False,
) -> list[VariantInfo]:
    """Export every variant into ``out_dir`` (``<variant>.onnx``) and write ``variants.json`` describing them.

    Each file is checked against its PyTorch model by ``check`` within ``bounds[variant]`` (a classifier's top-1
    agreement by default; the detector's export passes its own exporter, check and bounds, and ``float_head`` for
    ONNX Runtime's INT8, see :mod:`components.detection_export`)."""
    from components.models import count_flops, count_params
    from components.train import predict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(x_check.shape[1:])
    dense_flops, pruned_flops = count_flops(dense, shape), count_flops(pruned, shape)
    ref_dense, ref_pruned, ref_quant = predict(dense, x_check), predict(pruned, x_check), predict(quantized, x_check)
    infos: list[VariantInfo] = []

    def add(name: str, precision: str, quantization: str, backends: tuple[str, ...], pruned_flag: bool,
            model: nn.Module, flops: int, reference: np.ndarray) -> None:
        path = out / f"{name}.onnx"
        diff, agreement = check(path, reference, x_check, *bounds[name])
        infos.append(VariantInfo(name, path.name, precision, quantization, backends, pruned_flag,
                                 count_params(model), flops, diff, agreement))

    export(dense, out / "fp32-dense.onnx", shape)
    add("fp32-dense", "fp32", "none", ("tensorrt", "onnxruntime"), False, dense, dense_flops, ref_dense)
    export(pruned, out / "fp32.onnx", shape)
    add("fp32", "fp32", "none", ("tensorrt", "onnxruntime"), True, pruned, pruned_flops, ref_pruned)
    convert_fp16(out / "fp32.onnx", out / "fp16.onnx")
    add("fp16", "fp16", "none", ("tensorrt", "onnxruntime"), True, pruned, pruned_flops, ref_pruned)
    export(quantized, out / "int8-qdq.onnx", shape)
    add("int8-qdq", "int8", "modelopt-qdq", ("tensorrt",), True, quantized, pruned_flops, ref_quant)
    quantize_ort_int8(out / "fp32.onnx", out / "int8-ort.onnx", x_calibration, float_head=float_head)
    add("int8-ort", "int8", "ort-qdq", ("onnxruntime",), True, pruned, pruned_flops, ref_pruned)
    (out / "variants.json").write_text(json.dumps([asdict(i) for i in infos], indent=2))
    return infos


def load_calibration_info(out_dir: str | Path) -> dict:
    """What :func:`save_calibration_info` wrote (empty when the step that made ``out_dir`` recorded nothing)."""
    path = Path(out_dir) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def load_variant_infos(out_dir: str | Path) -> list[VariantInfo]:
    """Read ``variants.json`` written by :func:`export_variants`."""
    raw = json.loads((Path(out_dir) / "variants.json").read_text())
    return [VariantInfo(**{**item, "backends": tuple(item["backends"])}) for item in raw]
