"""TensorRT engine: build from the Q/DQ (or FP16) ONNX with the Python API, run with CUDA buffers.

Written for TensorRT 10.3 (JetPack 6.1/6.2, Python 3.10), the 10.x of JetPack 7 and 11 (11.4.1+ on JetPack 7.2.2+;
the pairs are in :mod:`edge_runtime.build.jetpack`). All build a *strongly typed*
network, so precision comes from the ONNX itself (Q/DQ nodes give INT8, an FP16 graph gives FP16) and no INT8/FP16
builder flags are set (TensorRT 11 has none): 10.3 needs the ``STRONGLY_TYPED`` creation flag, 11 has no other
mode. The batch range comes from an optimization profile — fixed when the ONNX has a fixed batch — and a timing
cache per TensorRT build and device makes rebuilds fast. TensorRT's own warnings and errors are captured and
returned with the result, so a failed build or load says why in the runtime's events.

Needs the ``tensorrt`` and ``cuda-python`` packages (on Jetson: JetPack's TensorRT and ``pip install cuda-python``);
``cuda.bindings.runtime`` (cuda-python ≥ 12.8, cuda-bindings 13) or ``cuda.cudart`` (older 12.x).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.build.engines.base import NUMPY_TO_DATATYPE, TensorInfo
from edgeloop_core.errors import EngineError, InvalidInput

WORKSPACE_BYTES = 1 << 30


def _trt() -> Any:  # noqa: ANN401 - the tensorrt module, present only where TensorRT is
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError("TensorRT is not installed on this device: use the onnxruntime backend") from exc
    return trt


def _cudart() -> Any:  # noqa: ANN401 - cuda-python's runtime module, present only on a GPU
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise EngineError("cuda-python is not installed: pip install cuda-python") from exc
    return cudart


def _check(result: Any, what: str) -> Any:  # noqa: ANN401 - cuda-python's (error, *values) tuples
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA {what} failed with error {int(err)}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def capturing_logger(trt: Any) -> Any:  # noqa: ANN401 - tensorrt module in, a trt.ILogger out
    """A TensorRT logger that keeps warnings and errors (``.messages``) for the runtime's events."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:  # noqa: ANN401 - trt.ILogger.Severity
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(f"{getattr(severity, 'name', severity)}: {msg}")

    return CapturingLogger()


def _said(logger: Any) -> str:  # noqa: ANN401 - the logger capturing_logger made
    return ("; TensorRT said: " + " | ".join(logger.messages[-5:])) if logger.messages else ""


def profile_shapes(shape: tuple[int, ...], batch_profile: tuple[int, int, int], name: str
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one input: the batch axis from ``batch_profile`` when it is dynamic, or the fixed
    batch the ONNX declares (then min = opt = max); every other axis must be static."""
    rest = tuple(shape[1:])
    if any(d < 0 for d in rest):
        raise EngineError(f"input {name} has dynamic non-batch dimensions {tuple(shape)}: TensorRT needs a profile for "
                          f"each of them, which this runtime does not build yet; serve it with onnxruntime")
    if shape[0] >= 1:  # a fixed batch in the ONNX: the profile cannot differ from it
        fixed = (shape[0], *rest)
        return fixed, fixed, fixed
    lo, opt, hi = batch_profile
    return (lo, *rest), (opt, *rest), (hi, *rest)


def build_trt(onnx_path: Path, engine_path: Path, *, batch_profile: tuple[int, int, int],
              timing_cache: Path | None = None) -> list[str]:
    """Build a serialized engine from ``onnx_path`` for the (min, opt, max) batch profile and write it atomically;
    returns TensorRT's warnings. :class:`EngineError` with TensorRT's messages when it cannot."""
    from edgeloop_core.files import write_atomic

    trt = _trt()
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        lo, opt, hi = profile_shapes(tuple(tensor.shape), batch_profile, tensor.name)
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    # TensorRT ignores a corrupt cache (or one of another build) with a warning and starts an empty one; the build
    # then rewrites the file. Should create_timing_cache return None instead, start from an empty cache, never fail.
    cache = config.create_timing_cache(cache_bytes) or config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path.name}{_said(logger)}")
    write_atomic(engine_path, bytes(serialized))
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return list(logger.messages)


class TrtEngine:
    """A deserialized engine with one execution context, a CUDA stream and device buffers that grow as needed."""

    platform = "tensorrt_plan"

    def __init__(self, engine_path: Path, *, max_batch_size: int) -> None:
        trt, self._cuda = _trt(), _cudart()
        self.logger = capturing_logger(trt)
        self.build_messages: list[str] = []
        """TensorRT's warnings from the build that made this plan (when this process built it)."""
        self._runtime = trt.Runtime(self.logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise EngineError(f"{engine_path.name} is not an engine for this TensorRT build and GPU"
                              f"{_said(self.logger)}")
        self._context = self._engine.create_execution_context()
        self.memory_bytes = engine_path.stat().st_size + int(self._engine.device_memory_size_v2)
        """The engine's weights (its plan's size) and the activation memory its execution context allocates."""
        self._stream = _check(self._cuda.cudaStreamCreate(), "stream creation")
        self._buffers: dict[str, tuple[int, int]] = {}
        """name → (device pointer, capacity in bytes)"""
        inputs, outputs = [], []
        self._dtypes: dict[str, np.dtype] = {}
        profile_max = max_batch_size
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self._engine.get_tensor_shape(name))
            self._dtypes[name] = dtype
            if not shape:
                raise EngineError(f"{name} is a scalar: this runtime serves tensors with a batch axis first")
            info = TensorInfo(name, NUMPY_TO_DATATYPE.get(dtype, str(dtype)), (-1 if shape[0] < 0 else shape[0],
                                                                               *shape[1:]))
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(info)
                hi = tuple(self._engine.get_tensor_profile_shape(name, 0)[2]) if shape[0] < 0 else shape
                profile_max = min(profile_max, hi[0])
            else:
                outputs.append(info)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.max_batch_size = profile_max

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            if pointer:
                self._cuda.cudaFree(pointer)
            pointer = _check(self._cuda.cudaMalloc(max(nbytes, 1)), f"allocation of {nbytes} bytes for {name}")
            self._buffers[name] = (pointer, max(nbytes, 1))
            if not self._context.set_tensor_address(name, pointer):
                raise EngineError(f"TensorRT refused the address of {name}")
        return pointer

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, kind = self._cuda, self._cuda.cudaMemcpyKind
        batch = self._batch_of(inputs)
        for info in self.inputs:
            host = np.ascontiguousarray(inputs[info.name], dtype=self._dtypes[info.name])
            if batch > self.max_batch_size:
                raise InvalidInput(f"batch {batch} exceeds the engine's maximum {self.max_batch_size}")
            if not self._context.set_input_shape(info.name, host.shape):
                raise InvalidInput(f"input {info.name} of shape {host.shape} is outside the engine's optimization "
                                   f"profile{_said(self.logger)}")
            pointer = self._buffer(info.name, host.nbytes)
            _check(cuda.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, kind.cudaMemcpyHostToDevice,
                                        self._stream), f"copy of {info.name} to the GPU")
        shapes = {}
        for info in self.outputs:
            shape = tuple(self._context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"output {info.name} has a data-dependent shape {shape}, which this runtime's "
                                  f"TensorRT path does not allocate yet: serve this model with onnxruntime")
            shapes[info.name] = shape
            self._buffer(info.name, int(np.prod(shape)) * self._dtypes[info.name].itemsize)
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError(f"TensorRT failed to run a batch{_said(self.logger)}")
        results = {}
        for info in self.outputs:
            host = np.empty(shapes[info.name], dtype=self._dtypes[info.name])
            _check(cuda.cudaMemcpyAsync(host.ctypes.data, self._buffers[info.name][0], host.nbytes,
                                        kind.cudaMemcpyDeviceToHost, self._stream), f"copy of {info.name} back")
            results[info.name] = host
        _check(cuda.cudaStreamSynchronize(self._stream), "stream synchronization")
        wrong = {name: r.shape for name, r in results.items() if not r.shape or r.shape[0] != batch}
        if wrong:
            raise EngineError(f"the engine returned outputs {wrong} for a batch of {batch}: each output must have the "
                              "batch as its first axis; serve this model with onnxruntime")
        return results

    def _batch_of(self, inputs: dict[str, np.ndarray]) -> int:
        """The batch size every input shares; :class:`InvalidInput` for a missing input or disagreeing batches."""
        missing = [info.name for info in self.inputs if info.name not in inputs]
        if missing:
            raise InvalidInput(f"missing input(s) {missing}: the engine takes {[i.name for i in self.inputs]}")
        batches = {info.name: np.shape(inputs[info.name])[:1] for info in self.inputs}
        if len(set(batches.values())) != 1 or () in batches.values():
            raise InvalidInput(f"inputs must share one batch size along their first axis, got "
                               f"{ {name: b[0] if b else None for name, b in batches.items()} }")
        return int(next(iter(batches.values()))[0])

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._cuda.cudaFree(pointer)
        self._buffers.clear()
        if self._stream is not None:
            self._cuda.cudaStreamDestroy(self._stream)
            self._stream = None
