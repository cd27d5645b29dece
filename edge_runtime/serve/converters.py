"""Open Inference Protocol messages ⇄ numpy arrays, with every check a request can fail."""

from __future__ import annotations

import numpy as np

from edge_runtime.engines.base import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, TensorInfo
from edge_runtime.errors import InvalidInput
from edge_runtime.protos import inference_pb2 as pb

_TYPED_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def request_to_inputs(request: pb.ModelInferRequest, expected: tuple[TensorInfo, ...],
                      max_batch_size: int) -> dict[str, np.ndarray]:
    """Decode and check every input: names, datatype, rank, fixed dimensions, batch size, byte counts."""
    if not request.inputs:
        raise InvalidInput("the request has no inputs")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs")
    by_name = {t.name: t for t in expected}
    arrays: dict[str, np.ndarray] = {}
    batch = None
    for index, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidInput(f"unknown input {tensor.name!r}; the model takes {sorted(by_name)}")
        if tensor.name in arrays:
            raise InvalidInput(f"input {tensor.name!r} given twice")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input {tensor.name!r} has datatype {tensor.datatype or '(none)'}, "
                               f"expected {spec.datatype}")
        shape = tuple(int(d) for d in tensor.shape)
        fits = len(shape) == len(spec.shape) and all(
            want in (-1, got) for want, got in zip(spec.shape, shape, strict=True))
        if not fits:
            raise InvalidInput(f"input {tensor.name!r} has shape {list(shape)}, expected {list(spec.shape)}")
        if shape[0] < 1 or shape[0] > max_batch_size:
            raise InvalidInput(f"batch size {shape[0]} of input {tensor.name!r} is outside 1..{max_batch_size}")
        if batch is not None and shape[0] != batch:
            raise InvalidInput("inputs disagree on the batch size")
        batch = shape[0]
        dtype = DATATYPE_TO_NUMPY[spec.datatype]
        count = int(np.prod(shape))
        if request.raw_input_contents:
            raw = request.raw_input_contents[index]
            if len(raw) != count * dtype.itemsize:
                raise InvalidInput(f"input {tensor.name!r}: {len(raw)} bytes for shape {list(shape)} of "
                                   f"{spec.datatype} (expected {count * dtype.itemsize})")
            array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        else:
            field = _TYPED_FIELDS.get(spec.datatype)
            values = getattr(tensor.contents, field) if field else ()
            if len(values) != count:
                raise InvalidInput(f"input {tensor.name!r}: {len(values)} values for shape {list(shape)}")
            array = np.asarray(values, dtype=dtype).reshape(shape)
        arrays[tensor.name] = array
    missing = set(by_name) - set(arrays)
    if missing:
        raise InvalidInput(f"missing inputs {sorted(missing)}")
    return arrays


def requested_outputs(request: pb.ModelInferRequest, available: tuple[TensorInfo, ...]) -> list[str]:
    """Names of the outputs to return (all when the request names none)."""
    names = [o.name for o in available]
    wanted = [o.name for o in request.outputs] or names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown}; the model produces {names}")
    return wanted


def outputs_to_response(request: pb.ModelInferRequest, version: str, outputs: dict[str, np.ndarray],
                        names: list[str]) -> pb.ModelInferResponse:
    """Raw little-endian row-major contents, one entry per output, as tritonclient expects."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        response.outputs.add(name=name, datatype=NUMPY_TO_DATATYPE.get(array.dtype, "FP32"), shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def tensor_metadata(infos: tuple[TensorInfo, ...]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """Metadata entries for inputs or outputs."""
    return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in infos]
