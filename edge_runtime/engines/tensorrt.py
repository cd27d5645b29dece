"""TensorRT engine: build from the Q/DQ (or FP16) ONNX with the Python API, run with CUDA buffers.

Written for TensorRT 10 (JetPack 6, Python 3.10) and 11. Both build a *strongly typed* network, so precision comes
from the ONNX itself (Q/DQ nodes give INT8, an FP16 graph gives FP16) and no INT8/FP16 builder flags are set;
TensorRT 10 needs the STRONGLY_TYPED creation flag, TensorRT 11 has no other mode. The batch range comes from an
optimization profile; a timing cache next to the engine makes rebuilds fast.

Needs the ``tensorrt`` and ``cuda-python`` packages (on Jetson: JetPack's TensorRT and ``pip install cuda-python``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.engines.base import NUMPY_TO_DATATYPE, TensorInfo
from edge_runtime.errors import EngineError

WORKSPACE_BYTES = 1 << 30


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError("TensorRT is not installed on this device: use the onnxruntime backend") from exc
    return trt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise EngineError("cuda-python is not installed: pip install cuda-python") from exc
    return cudart


def _check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA call failed with error {int(err)}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def build_trt(onnx_path: Path, engine_path: Path, *, batch_profile: tuple[int, int, int],
              timing_cache: Path | None = None) -> Path:
    """Build a serialized engine from ``onnx_path`` for the (min, opt, max) batch profile; atomic write."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch_profile
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise EngineError(f"input {tensor.name} has dynamic non-batch dimensions {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    from edge_runtime.cache import write_atomic

    write_atomic(engine_path, bytes(serialized))
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return engine_path


class TrtEngine:
    """A deserialized engine with one execution context, a CUDA stream and device buffers sized for max batch."""

    platform = "tensorrt_plan"

    def __init__(self, engine_path: Path, *, max_batch_size: int) -> None:
        trt, self._cuda = _trt(), _cudart()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise EngineError(f"{engine_path} is not an engine for this TensorRT/GPU: rebuild it")
        self._context = self._engine.create_execution_context()
        self._stream = _check(self._cuda.cudaStreamCreate())
        self.max_batch_size = max_batch_size
        inputs, outputs = [], []
        self._buffers: dict[str, tuple[int, np.dtype]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self._engine.get_tensor_shape(name))
            info = TensorInfo(name, NUMPY_TO_DATATYPE.get(dtype, str(dtype)), (-1, *shape[1:]))
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(info)
            nbytes = int(np.prod(shape[1:])) * max_batch_size * dtype.itemsize
            pointer = _check(self._cuda.cudaMalloc(nbytes))
            self._buffers[name] = (pointer, dtype)
            self._context.set_tensor_address(name, pointer)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        kind = cuda.cudaMemcpyKind
        batch = 0
        for info in self.inputs:
            host = np.ascontiguousarray(inputs[info.name], dtype=self._buffers[info.name][1])
            batch = host.shape[0]
            if batch > self.max_batch_size:
                raise EngineError(f"batch {batch} exceeds the engine's maximum {self.max_batch_size}")
            self._context.set_input_shape(info.name, host.shape)
            _check(cuda.cudaMemcpyAsync(self._buffers[info.name][0], host.ctypes.data, host.nbytes,
                                        kind.cudaMemcpyHostToDevice, self._stream))
        if not self._context.execute_async_v3(self._stream):
            raise EngineError("TensorRT failed to run a batch")
        results = {}
        for info in self.outputs:
            shape = tuple(self._context.get_tensor_shape(info.name))
            host = np.empty(shape, dtype=self._buffers[info.name][1])
            _check(cuda.cudaMemcpyAsync(host.ctypes.data, self._buffers[info.name][0], host.nbytes,
                                        kind.cudaMemcpyDeviceToHost, self._stream))
            results[info.name] = host
        _check(cuda.cudaStreamSynchronize(self._stream))
        assert all(r.shape[0] == batch for r in results.values())
        return results

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._cuda.cudaFree(pointer)
        self._buffers.clear()
        self._cuda.cudaStreamDestroy(self._stream)
