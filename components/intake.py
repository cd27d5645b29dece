"""Model intake for bring-your-own ONNX: inspect a published model and normalise it before quantization.

What it changes (each change is recorded, and goes into the manifest's ``training["intake"]``):

* **initializers listed as graph inputs** (old exporters) stop being inputs;
* **opset** below :data:`TARGET_OPSET`'s floor is upgraded with ``onnx.version_converter`` (per-channel Q/DQ needs
  opset 13, TensorRT 10.3's parser wants ≥ 13), then ``onnx.checker``-ed;
* **a fixed batch** becomes a dynamic one when the graph allows: every input's and output's leading dimension
  becomes ``batch``, and a ``Reshape`` whose constant target shape hard-codes the batch copies it from its input
  instead (``0``; a constant several Reshapes share, as YOLOv8's head does, is rewritten once for all of them). The
  result must pass ``onnx.checker`` and agree with the original, sample by sample, at batch 1 and 2; otherwise the
  model keeps its fixed batch, and calibration, agreement, validation and serving all run at that batch (the
  manifest's input shape says so, the batcher never merges past it, TensorRT's profile is fixed). The change
  recorded then says why in the words of whatever refused: the checker's message, ONNX Runtime's, or the output
  that a batch of 2 changes (``edgeloop pipeline import-onnx`` prints it).

What it refuses, with one line that names the node or tensor and says what to do: sequence, map or optional inputs
or outputs, inputs of unknown rank, inputs or outputs of a type edgeloop does not serve (strings, bfloat16, 8-bit
floats, ...), operators outside the standard ONNX domains (TensorRT 10.3 has no parser for them), sequence/string
operators, and an opset that cannot be converted. Models over 2 GB keep their weights as external data next to the
graph.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeloop_core.contract import TensorSpec
from edgeloop_core.errors import ConfigError, ContractError

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

TARGET_OPSET = 17
MIN_OPSET = 13
STANDARD_DOMAINS = ("", "ai.onnx")
UNSUPPORTED_OPS = {"SequenceConstruct", "SequenceAt", "SequenceInsert", "SequenceErase", "SequenceLength",
                   "SequenceEmpty", "SplitToSequence", "ConcatFromSequence", "StringNormalizer", "TfIdfVectorizer",
                   "RegexFullMatch", "StringConcat", "StringSplit", "Optional", "OptionalGetElement",
                   "OptionalHasElement"}
"""Standard operators with no TensorRT 10.3 import (sequences, strings, optionals)."""
EXTERNAL_DATA_BYTES = 1800 << 20
"""Above this the graph is saved with its weights in a side file (protobuf's 2 GB limit)."""
INTAKE_FILE = "intake.json"
ONNX_TO_DATATYPE = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL",
                    10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64"}
"""ONNX element types (``onnx.TensorProto.DataType``) edgeloop serves, as Open Inference Protocol datatypes; strings,
bfloat16, complex, 8-bit floats and 4-bit integers are refused at intake."""


class ModelRefused(ConfigError):  # noqa: N818 - named for the condition, like edgeloop_core.errors
    """An ONNX model the intake cannot bring into shape; ``str()`` names what and what to do."""


def datatype(elem_type: int, what: str) -> str:
    """The Open Inference Protocol datatype of an ONNX element type; ModelRefused naming ``what`` (``"input 'x'"``)
    for a type edgeloop does not serve."""
    import onnx

    if elem_type not in ONNX_TO_DATATYPE:
        raise ModelRefused(f"{what} is {onnx.TensorProto.DataType.Name(elem_type)}, which edgeloop does not serve: "
                           f"re-export the model with tensors of {', '.join(sorted(set(ONNX_TO_DATATYPE.values())))}")
    return ONNX_TO_DATATYPE[elem_type]


def tensor_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph; every symbolic or unknown dimension becomes -1."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        kind = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
        return TensorSpec(name=value.name, datatype=datatype(kind.elem_type, repr(value.name)), shape=shape)

    return [spec(v) for v in graph.input if v.name not in initializers], [spec(v) for v in graph.output]


@dataclass
class IntakeReport:
    """What the intake found and changed."""

    opset_before: int
    opset_after: int
    fixed_batch: int | None
    """The batch the model keeps when it could not be made dynamic (``None``: dynamic)."""
    changes: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    """name → ONNX element type, for the report."""

    def save(self, directory: Path) -> Path:
        """Write ``intake.json`` into ``directory``."""
        path = Path(directory) / INTAKE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory: Path) -> IntakeReport | None:
        """What :meth:`save` wrote, or ``None``."""
        path = Path(directory) / INTAKE_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), default=0)


def _check_types(model: onnx.ModelProto) -> dict[str, str]:
    import onnx

    types = {}
    initializers = {i.name for i in model.graph.initializer}
    inputs = [("input", v) for v in model.graph.input if v.name not in initializers]
    for role, value in inputs + [("output", v) for v in model.graph.output]:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise ModelRefused(f"{role} {value.name!r} is {(kind or 'untyped').replace('_type', '')}, not a tensor: "
                               f"edgeloop serves tensors only; re-export the model with tensor {role}s")
        tensor = value.type.tensor_type
        if role == "input" and not tensor.HasField("shape"):
            raise ModelRefused(f"input {value.name!r} has an unknown rank: re-export it with a fixed number of "
                               f"dimensions (dynamic sizes are fine)")
        datatype(tensor.elem_type, f"{role} {value.name!r}")
        if role == "input":
            types[value.name] = onnx.TensorProto.DataType.Name(tensor.elem_type)
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise ModelRefused(f"node {node.name or node.op_type!r} uses {node.domain}::{node.op_type}, which TensorRT "
                               f"10.3 cannot import: re-export the model with standard ONNX operators")
        if node.op_type in UNSUPPORTED_OPS:
            raise ModelRefused(f"node {node.name or node.op_type!r} ({node.op_type}) has no TensorRT 10.3 import: "
                               f"re-export the model without sequence, string or optional operators")
    return types


def _session(model_bytes: bytes, *, quiet: bool = False):  # noqa: ANN202 - onnxruntime session
    """An ONNX Runtime CPU session; ``quiet``: not even errors are logged (a trial whose exception says why)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _per_sample(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``session`` run one sample at a time, concatenated (the reference for a fixed-batch model)."""
    count = len(next(iter(inputs.values())))
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(count)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(names))]


def _agrees(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.allclose(x, y, rtol=1e-4, atol=1e-5)
                                    for x, y in zip(a, b, strict=True))


def _unique_name(graph: onnx.GraphProto, wanted: str) -> str:
    """``wanted``, or ``wanted`` with a numeric suffix, unused by any initializer, node output or graph input."""
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | {
        v.name for v in graph.input}
    name, count = wanted, 1
    while name in taken:
        name, count = f"{wanted}_{count}", count + 1
    return name


def _make_batch_dynamic(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with a dynamic leading axis; returns it and how many Reshapes were rewritten.

    A Reshape whose constant target shape starts with the batch gets a copy of that shape with ``0`` (copy the
    input's leading axis) in front. Exporters often share one shape constant between several Reshapes (YOLOv8's
    head reshapes its three scales with one): each shared constant gets one rewritten copy, used by all of them,
    so the graph never holds two initializers of one name.
    """
    import onnx
    from onnx import numpy_helper

    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    graph = candidate.graph
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = "batch"
    del graph.value_info[:]  # stale shapes: inferred again below
    constants = {i.name: i for i in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    copies: dict[str, str] = {}  # shape constant -> its batch-copying rewrite
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        target = numpy_helper.to_array(constants[node.input[1]])
        if target.ndim != 1 or target.size < 2 or int(target[0]) != batch:
            continue
        if node.input[1] not in copies:
            new = target.copy()
            new[0] = 0  # copy the batch from the input (allowzero is 0 by default)
            name = _unique_name(graph, f"{node.input[1]}/edgeloop_dynamic_batch")
            graph.initializer.append(numpy_helper.from_array(new.astype(target.dtype), name))
            copies[node.input[1]] = name
        node.input[1] = copies[node.input[1]]
        rewritten += 1
    return onnx.shape_inference.infer_shapes(candidate), rewritten


ORT_NODE_FAILURE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' "
                              r"Status Message: (?:\S+:\d+ \w+ )?(.*)")
"""ONNX Runtime's words for a node that failed: the operator, the node's name, and (after the source location) why."""


def _first_line(exc: BaseException) -> str:
    """What ``exc`` says, in one line of at most 300 characters: the first line (checker messages run over
    several), or for a node ONNX Runtime could not run, ``"Concat node 'join': <why>"``."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    failed = ORT_NODE_FAILURE.search(text)
    if failed:
        text = f"{failed.group(1)} node {failed.group(2)!r}: {failed.group(3)}"
    return text[:300]


def _differs(a: list[np.ndarray], b: list[np.ndarray], names: list[str]) -> str | None:
    """Why batch-2 outputs ``a`` are not the per-sample outputs ``b``, in one line (``None``: they agree)."""
    for name, x, y in zip(names, a, b, strict=True):
        if x.shape != y.shape:
            return f"at batch 2 output {name!r} has shape {list(x.shape)}, one sample at a time {list(y.shape)}"
        if not np.allclose(x, y, rtol=1e-4, atol=1e-5):
            worst = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
            return (f"at batch 2 output {name!r} differs from the same samples run one at a time "
                    f"(max |difference| {worst:.3g})")
    return None


def _try_dynamic_batch(model: onnx.ModelProto, batch: int, original: ort.InferenceSession,
                       sample: dict[str, np.ndarray]) -> tuple[onnx.ModelProto | None, str]:
    """``(model with a dynamic batch, what changed)``, or ``(None, why not)`` — the reason is what ``onnx.checker``
    or ONNX Runtime said, or which output a batch of 2 changes."""
    import onnx

    try:
        dynamic, rewritten = _make_batch_dynamic(model, batch)
    except Exception as exc:  # noqa: BLE001 - shape inference's own words are the reason
        return None, f"ONNX shape inference fails with a dynamic batch ({_first_line(exc)})"
    try:
        onnx.checker.check_model(dynamic)
    except Exception as exc:  # noqa: BLE001 - the checker's own words are the reason
        return None, f"onnx.checker refuses the graph with a dynamic batch ({_first_line(exc)})"
    two = {k: np.concatenate([v[:1], v[1:2] if len(v) > 1 else v[:1]]) for k, v in sample.items()}
    try:
        session = _session(_serialize(dynamic), quiet=True)
        names = [o.name for o in session.get_outputs()]
        got = session.run(names, two)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own words are the reason
        return None, f"ONNX Runtime cannot run it at batch 2 ({_first_line(exc)})"
    reason = _differs(got, _per_sample(original, two), names)
    if reason is not None:
        return None, reason
    return dynamic, (f"fixed batch {batch} made dynamic"
                     + (f" ({rewritten} Reshape(s) no longer hard-code it)" if rewritten else ""))


def normalise(source: Path, calibration: dict[str, np.ndarray], dest: Path) -> IntakeReport:
    """Inspect ``source``, normalise it (see the module docstring) into ``dest``; the report says what changed.

    ``calibration`` (arrays by input name) checks that every change keeps the outputs.
    """
    import onnx
    from onnx import version_converter

    try:
        model = onnx.load(str(source))
    except Exception as exc:
        raise ModelRefused(f"{source.name} is not a readable ONNX model ({type(exc).__name__}): check the "
                           f"file") from exc
    types = _check_types(model)
    report = IntakeReport(opset_before=_opset(model), opset_after=_opset(model), fixed_batch=None, inputs=types)
    missing = set(types) - set(calibration)
    if missing:
        raise ConfigError(f"the calibration set has no arrays for input(s) {sorted(missing)} (it has "
                          f"{sorted(calibration)}): name the .npz arrays after the model's inputs")
    initializers = {i.name for i in model.graph.initializer}
    as_inputs = [v for v in model.graph.input if v.name in initializers]
    for value in as_inputs:
        model.graph.input.remove(value)
    if as_inputs:
        report.changes.append(f"{len(as_inputs)} initializers were listed as graph inputs: no longer inputs")
    original = _session(_serialize(model))
    sample = {k: np.asarray(v[:4]) for k, v in calibration.items() if k in types}
    reference = _per_sample(original, sample)
    if report.opset_before < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, TARGET_OPSET)
            onnx.checker.check_model(model)
        except Exception as exc:
            raise ModelRefused(f"cannot convert opset {report.opset_before} to {TARGET_OPSET}: "
                               f"{str(exc).splitlines()[0][:200]}; re-export the model at opset {MIN_OPSET} or "
                               f"newer") from exc
        if not _agrees(_per_sample(_session(_serialize(model)), sample), reference):
            raise ModelRefused(f"the opset {report.opset_before} → {TARGET_OPSET} conversion changed the outputs: "
                               f"re-export the model at opset {MIN_OPSET} or newer")
        report.opset_after = _opset(model)
        report.changes.append(f"opset {report.opset_before} upgraded to {report.opset_after}")
    batches = {v.type.tensor_type.shape.dim[0].dim_value for v in model.graph.input
               if v.name in types and v.type.tensor_type.shape.dim
               and v.type.tensor_type.shape.dim[0].HasField("dim_value")}
    if batches:
        batch = batches.pop() if len(batches) == 1 else None
        if batch is None:
            raise ModelRefused("the inputs declare different fixed batch sizes: re-export with one batch axis")
        dynamic, change = _try_dynamic_batch(model, batch, original, sample)
        if dynamic is not None:
            model = dynamic
            report.changes.append(change)
        else:
            report.fixed_batch = batch
            report.changes.append(f"the batch stays fixed at {batch}: {change} (calibration, validation and "
                                  f"serving run at batch {batch})")
    onnx.checker.check_model(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save(model, str(dest), save_as_external_data=large, location=dest.name + ".data" if large else None)
    if not _agrees(_per_sample(_session(str(dest)), sample), reference):
        raise ContractError("the normalised model's outputs differ from the original's: please report this model")
    return report


@dataclass(frozen=True)
class ImagePreprocessing:
    """How calibration images become the model's input: resize to the input's height and width, ``x = (pixel *
    scale - mean) / std`` per channel, in ``layout``. Recorded in the manifest so clients do the same."""

    layout: str = "NCHW"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def parse(cls, layout: str, scale: float, mean: str, std: str) -> ImagePreprocessing:
        """From pipeline parameters (``mean``/``std``: comma-separated, one value or one per channel)."""
        if layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"calibration_layout must be NCHW or NHWC, got {layout!r}")
        try:
            means = tuple(float(v) for v in mean.split(",")) if mean else (0.0,)
            stds = tuple(float(v) for v in std.split(",")) if std else (1.0,)
        except ValueError as exc:
            raise ConfigError(f"calibration_mean/std must be comma-separated numbers, got {mean!r} / {std!r}") from exc
        if any(s == 0 for s in stds):
            raise ConfigError("calibration_std must not contain 0")
        return cls(layout, float(scale), means, stds)


def read_image_calibration(folder: Path, model_path: Path, prep: ImagePreprocessing, *,
                           limit: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration arrays from a folder of images (searched recursively) for a model with one image input.

    At most ``limit`` images, a seeded random choice among all of them, are read — one at a time, so a large folder
    costs no more memory than the sample.
    """
    import onnx
    from PIL import Image, UnidentifiedImageError

    from components.data import IMAGE_SUFFIXES

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise ConfigError(f"a folder of images calibrates a model with one input; this one has "
                          f"{[v.name for v in inputs]}: use an .npz with one array per input")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ConfigError(f"input {inputs[0].name!r} has shape {dims}: an image input is 4-D ({prep.layout})")
    channels, height, width = (dims[1], dims[2], dims[3]) if prep.layout == "NCHW" else (dims[3], dims[1], dims[2])
    if min(channels, height, width) < 1 or channels not in (1, 3):
        raise ConfigError(f"input {inputs[0].name!r} of shape {dims} needs a fixed height, width and 1 or 3 channels "
                          f"in {prep.layout} to take images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    chosen = [files[i] for i in sorted(np.random.default_rng(seed).permutation(len(files))[:limit])]
    mean = np.asarray(prep.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(prep.std, np.float32).reshape(-1, 1, 1)
    samples = []
    for index, file in enumerate(chosen, start=1):
        try:
            with Image.open(file) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"{file}: not a readable image ({exc})") from exc
        chw = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        chw = (chw * prep.scale - mean) / std
        samples.append(chw if prep.layout == "NCHW" else chw.transpose(1, 2, 0))
        if index % max(1, len(chosen) // 4) == 0:
            print(f"calibration images: {index}/{len(chosen)}", flush=True)
    return {inputs[0].name: np.stack(samples).astype(np.float32)}


def model_batch(path: Path) -> int | None:
    """The fixed batch a model's inputs declare, or ``None`` when the batch axis is dynamic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in initializers and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def batches(arrays: dict[str, np.ndarray], batch: int, *, fixed: bool) -> list[dict[str, np.ndarray]]:
    """``arrays`` cut into consecutive batches of ``batch`` rows; with a ``fixed`` batch a short last one is
    dropped (the model accepts no other size)."""
    count = len(next(iter(arrays.values())))
    out = []
    for start in range(0, count, batch):
        part = {k: v[start : start + batch] for k, v in arrays.items()}
        if not fixed or len(next(iter(part.values()))) == batch:
            out.append(part)
    return out
