"""What every engine offers the validator and the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPE_TO_NUMPY.items()}


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the server advertises it (Open Inference Protocol names)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 for the dynamic batch axis."""


class Engine(Protocol):
    """A loaded model, ready to run batches."""

    platform: str
    """``onnxruntime_onnx`` or ``tensorrt_plan`` (as Triton names platforms)."""
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    max_batch_size: int
    memory_bytes: int
    """Memory the loaded engine holds (weights and working memory), recorded with the engine file."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; every input has the batch axis first. Thread-safe for one caller at a time."""
        ...

    def close(self) -> None:
        """Release device memory."""
        ...
