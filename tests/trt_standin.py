"""A strict stand-in for TensorRT's Python bindings and cuda-python, so the TensorRT path runs in ``make test``.

**This is not TensorRT.** No machine here has TensorRT or a GPU; this module lets the runtime's TensorRT code run
end to end and holds it to the real APIs' contracts, taken from NVIDIA's bindings (``python/src/infer/pyCore.cpp``
at the v10.3.0 and v11.0 tags of NVIDIA/TensorRT) and cuda-python's runtime module. What it checks:

* **Names and values per API level.** ``install(api="10.3")`` exposes ``BuilderFlag.FP16``/``INT8`` and
  ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` (0)/``STRONGLY_TYPED`` (1); ``api="11"`` has no FP16/INT8 builder
  flags and ``STRONGLY_TYPED`` is 0, ``PREFER_JIT_PYTHON_PLUGINS`` 1, ``PREFER_AOT_PYTHON_PLUGINS`` 2 (so
  ``1 << STRONGLY_TYPED`` is a different bit at each level): touching a missing member raises ``AttributeError`` as
  the real module does. Every value is the real one (:data:`ENUMS`), checked against NVIDIA/TensorRT at tag v10.3.0
  (commit 7ad13e72): ``include/NvInfer.h`` lines 8297-8430 (``enum class BuilderFlag``, ``kFP16 = 0`` ..
  ``kREFIT_INDIVIDUAL = 23``) and 9609-9620 (``kEXPLICIT_BATCH = 0``, ``kSTRONGLY_TYPED = 1``), bound in
  ``python/src/infer/pyCore.cpp`` lines 1337-1367 and 1500-1505; and at tag v11.0 (commit 771d8efd):
  ``include/NvInfer.h`` lines 9978-10114 (``kDEBUG = 2`` .. ``kDISTRIBUTIVE_INDEPENDENCE = 27``, no kFP16/kINT8) and
  11406-11424 (``kSTRONGLY_TYPED = 0``, ``kPREFER_JIT_PYTHON_PLUGINS = 1``, ``kPREFER_AOT_PYTHON_PLUGINS = 2``), bound
  in ``python/src/infer/pyCore.cpp`` lines 1592-1616 and 1762-1769. 10.3 comes with cuda-python 12
  (``cuda.cudart`` and ``cuda.bindings.runtime``), 11 with cuda-bindings 13 (no ``cuda.cudart``).
* **Argument names.** Methods take the keyword names the bindings declare (``set_shape(input, min, opt, max)``,
  ``set_input_shape(name, shape)``, ``execute_async_v3(stream_handle)``, ``set_memory_pool_limit(pool,
  pool_size)``, ``create_timing_cache(serialized_timing_cache)``, ``set_timing_cache(cache, ignore_mismatch)``
  (pyCore.cpp v10.3.0 lines 1480-1483), ``deserialize_cuda_engine(serialized_engine)`` (line 1539), ...);
  ``execute_async_v3`` wants an ``int`` handle.
* **Profiles.** ``set_shape`` raises ``RuntimeError`` unless min ≤ opt ≤ max per dimension and static dimensions
  match the network; building fails (``None``, with an error logged) when an input has no profile.
* **Plans, as portable as real ones.** A plan records the TensorRT build (major.minor.patch.build) and the device
  (name, compute capability, SM count) it was built for. ``deserialize_cuda_engine`` logs an error and returns
  ``None`` for another TensorRT build, another compute capability ("generated on an incompatible device, expecting
  compute 8.7 got compute 9.0"), or bytes that are not a plan; a device of the *same* compute capability but another
  model (an Orin Nano loading an Orin NX plan) gets the plan with TensorRT's warning "Using an engine plan file across
  different models of devices is not recommended", as real TensorRT does. The runtime's target key (module, SM count)
  is what keeps such plans apart, and the tests hold it to that.
* **Timing caches, validated.** A serialized cache records the TensorRT build and the device it was timed on.
  ``create_timing_cache`` on bytes that are not a cache, or a cache of another TensorRT build, logs a warning and
  gives a new empty cache (TensorRT ignores a corrupt cache; a build must not fail for it); ``set_timing_cache``
  refuses (``False``, error logged) a cache from another device unless ``ignore_mismatch`` is true (then it warns),
  as ``IBuilderConfig::setTimingCache`` documents (NvInfer.h v10.3.0 lines 9268-9285). A build adds its timings.
* **Execution.** ``set_input_shape`` returns ``False`` outside the profile; ``execute_async_v3`` fails unless every
  input shape and tensor address is set and the buffers are large enough. Bytes really move: ``cudaMalloc`` hands
  out device buffers, ``cudaMemcpyAsync`` copies host memory in and out, and the engine computes its outputs with
  ONNX Runtime on the ONNX the plan was built from, so validation measures something.
* **CUDA errors.** Every cuda-python call returns a tuple whose first item is a ``cudaError_t``; ``gpu=False``
  makes device queries fail with ``cudaErrorNoDevice`` (what a pod without the ``video`` group sees).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import sys
import types
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAGIC = b"EDGELOOP-TRT-STANDIN\n"
FULL_VERSIONS = {"10.3": "10.3.0.30", "11": "11.0.0.114"}
ENUMS: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    # (NetworkDefinitionCreationFlag, BuilderFlag) with the values of include/NvInfer.h at each tag; the names are the
    # ones python/src/infer/pyCore.cpp binds (see the module docstring for the lines).
    "10.3": ({"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
             {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
              "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9,
              "PREFER_PRECISION_CONSTRAINTS": 10, "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12,
              "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15, "ERROR_ON_TIMING_CACHE_MISS": 16,
              "BF16": 17, "DISABLE_COMPILATION_CACHE": 18, "STRIP_PLAN": 19, "WEIGHTLESS": 19, "REFIT_IDENTICAL": 20,
              "WEIGHT_STREAMING": 21, "INT4": 22, "REFIT_INDIVIDUAL": 23}),
    "11": ({"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2},
           {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
            "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
            "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18, "REFIT_IDENTICAL": 19,
            "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23, "MONITOR_MEMORY": 24,
            "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27}),
}
TIMING_MAGIC = b"EDGELOOP-TRT-STANDIN-TIMING\n"


@dataclass
class Device:
    """The GPU the stand-in pretends to have (an Orin NX 16GB by default)."""

    name: str = "Orin"
    major: int = 8
    minor: int = 7
    sm_count: int = 8
    memory_bytes: int = 16 << 30


def _enum(name: str, members: dict[str, int]) -> type[IntEnum]:
    return IntEnum(name, members)


class _Dims(tuple):
    """``trt.Dims``: a tuple of ints (-1 for dynamic)."""


def _dims(value) -> _Dims:
    return _Dims(int(v) for v in value)


@dataclass
class _Cuda:
    """Device memory and streams shared by the tensorrt and cudart stand-ins."""

    device: Device
    gpu: bool
    buffers: dict[int, bytearray] = field(default_factory=dict)
    streams: set[int] = field(default_factory=set)
    _next: itertools.count = field(default_factory=lambda: itertools.count(0x7F0000000000, 1 << 20))

    def read(self, pointer: int, count: int) -> bytes:
        buffer = self.buffers.get(pointer)
        if buffer is None or count > len(buffer):
            raise ValueError(f"device pointer {pointer:#x} ({count} bytes) is not an allocation of that size")
        return bytes(buffer[:count])

    def write(self, pointer: int, data: bytes) -> None:
        buffer = self.buffers.get(pointer)
        if buffer is None or len(data) > len(buffer):
            raise ValueError(f"device pointer {pointer:#x} cannot take {len(data)} bytes")
        buffer[: len(data)] = data


def _cudart_module(state: _Cuda, name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    err = _enum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1, "cudaErrorMemoryAllocation": 2,
                                "cudaErrorNoDevice": 100, "cudaErrorInvalidResourceHandle": 400,
                                "cudaErrorNotSupported": 801})
    kind = _enum("cudaMemcpyKind", {"cudaMemcpyHostToHost": 0, "cudaMemcpyHostToDevice": 1,
                                    "cudaMemcpyDeviceToHost": 2, "cudaMemcpyDeviceToDevice": 3,
                                    "cudaMemcpyDefault": 4})
    mod.cudaError_t, mod.cudaMemcpyKind = err, kind

    class cudaStream_t:  # noqa: N801 - cuda-python's name
        def __init__(self, handle: int) -> None:
            self._handle = handle

        def __int__(self) -> int:
            return self._handle

    @dataclass
    class cudaDeviceProp:  # noqa: N801
        name: bytes
        major: int
        minor: int
        multiProcessorCount: int  # noqa: N815
        totalGlobalMem: int  # noqa: N815

    def cudaGetDeviceCount():  # noqa: N802
        return (err.cudaSuccess, 1) if state.gpu else (err.cudaErrorNoDevice, 0)

    def cudaGetDeviceProperties(device):  # noqa: N802
        if not state.gpu:
            return err.cudaErrorNoDevice, None
        if int(device) != 0:
            return err.cudaErrorInvalidValue, None
        d = state.device
        return err.cudaSuccess, cudaDeviceProp(d.name.encode() + b"\0" * 8, d.major, d.minor, d.sm_count,
                                               d.memory_bytes)

    def cudaMalloc(size):  # noqa: N802
        if not state.gpu:
            return err.cudaErrorNoDevice, 0
        if int(size) <= 0:
            return err.cudaErrorInvalidValue, 0
        pointer = next(state._next)
        state.buffers[pointer] = bytearray(int(size))
        return err.cudaSuccess, pointer

    def cudaFree(devPtr):  # noqa: N802, N803
        return (err.cudaSuccess,) if state.buffers.pop(int(devPtr), None) is not None else (err.cudaErrorInvalidValue,)

    def cudaStreamCreate():  # noqa: N802
        if not state.gpu:
            return err.cudaErrorNoDevice, None
        handle = next(state._next)
        state.streams.add(handle)
        return err.cudaSuccess, cudaStream_t(handle)

    def _stream_ok(stream) -> bool:
        return stream is not None and int(stream) in state.streams

    def cudaStreamSynchronize(stream):  # noqa: N802
        return (err.cudaSuccess,) if _stream_ok(stream) else (err.cudaErrorInvalidResourceHandle,)

    def cudaStreamDestroy(stream):  # noqa: N802
        if not _stream_ok(stream):
            return (err.cudaErrorInvalidResourceHandle,)
        state.streams.discard(int(stream))
        return (err.cudaSuccess,)

    def cudaMemcpyAsync(dst, src, count, kind_, stream):  # noqa: N802
        if not _stream_ok(stream) or not isinstance(kind_, kind):
            return (err.cudaErrorInvalidValue,)
        try:
            if kind_ == kind.cudaMemcpyHostToDevice:
                state.write(int(dst), ctypes.string_at(int(src), int(count)))
            elif kind_ == kind.cudaMemcpyDeviceToHost:
                data = state.read(int(src), int(count))
                ctypes.memmove(int(dst), data, len(data))
            else:
                return (err.cudaErrorNotSupported,)
        except ValueError:
            return (err.cudaErrorInvalidValue,)
        return (err.cudaSuccess,)

    for fn in (cudaGetDeviceCount, cudaGetDeviceProperties, cudaMalloc, cudaFree, cudaStreamCreate,
               cudaStreamSynchronize, cudaStreamDestroy, cudaMemcpyAsync):
        setattr(mod, fn.__name__, fn)
    mod.cudaStream_t = cudaStream_t
    return mod


def _tensorrt_module(api: str, state: _Cuda, version: str) -> types.ModuleType:
    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__standin__ = True

    Severity = _enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})  # noqa: N806 - TensorRT's own name

    severity_enum = Severity

    class ILogger:
        Severity = severity_enum
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (severity_enum.INTERNAL_ERROR, severity_enum.ERROR,
                                                         severity_enum.WARNING, severity_enum.INFO,
                                                         severity_enum.VERBOSE)

        def __init__(self) -> None:
            self.min_severity = Severity.WARNING

        def log(self, severity, msg):
            raise RuntimeError("ILogger.log must be overridden by a derived class")

    class Logger(ILogger):
        def __init__(self, min_severity=Severity.WARNING) -> None:
            super().__init__()
            self.min_severity = min_severity

        def log(self, severity, msg) -> None:
            if severity <= self.min_severity:
                print(f"[TRT] {msg}", file=sys.stderr)

    DataType = _enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6,  # noqa: N806 - TensorRT's own name
                                  "BF16": 7, "INT64": 8, "INT4": 9})
    to_numpy = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
                DataType.UINT8: np.uint8}
    from_onnx = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
                 onnx.TensorProto.INT8: DataType.INT8, onnx.TensorProto.INT32: DataType.INT32,
                 onnx.TensorProto.INT64: DataType.INT64, onnx.TensorProto.BOOL: DataType.BOOL,
                 onnx.TensorProto.UINT8: DataType.UINT8}

    def nptype(trt_type):
        if trt_type in to_numpy:
            return to_numpy[trt_type]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    TensorIOMode = _enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})  # noqa: N806 - TensorRT's own name
    MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2,  # noqa: N806 - TensorRT's own name
                                              "DLA_GLOBAL_DRAM": 3, "TACTIC_DRAM": 4, "TACTIC_SHARED_MEMORY": 5})
    creation, flags = ENUMS[api]
    NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", creation)  # noqa: N806 - TensorRT's own name
    BuilderFlag = _enum("BuilderFlag", flags)  # noqa: N806 - TensorRT's own name

    @dataclass
    class ITensor:
        name: str
        shape: _Dims
        dtype: object

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.onnx: bytes | None = None
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, index: int) -> ITensor:
            return self.inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self.outputs[index]

    def _tensor(value) -> ITensor:
        t = value.type.tensor_type
        if t.elem_type not in from_onnx:
            raise ValueError(f"unsupported data type {t.elem_type} for {value.name}")
        return ITensor(value.name, _dims(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim),
                       from_onnx[t.elem_type])

    class ParserError:
        def __init__(self, text: str) -> None:
            self._text = text

        def desc(self) -> str:
            return self._text

        def __str__(self) -> str:
            return self._text

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            self.network, self.logger, self.errors = network, logger, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

        def parse(self, model, path=None) -> bool:
            try:
                proto = onnx.load_from_string(bytes(model))
                onnx.checker.check_model(proto)
                initializers = {i.name for i in proto.graph.initializer}
                self.network.inputs = [_tensor(v) for v in proto.graph.input if v.name not in initializers]
                self.network.outputs = [_tensor(v) for v in proto.graph.output]
            except Exception as exc:  # noqa: BLE001 - the real parser reports, it does not raise
                self.errors.append(ParserError(f"ModelImporter: {exc}"))
                return False
            self.network.onnx = bytes(model)
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[_Dims, _Dims, _Dims]] = {}

        def set_shape(self, input, min, opt, max) -> None:
            lo, mid, hi = _dims(min), _dims(opt), _dims(max)
            if not (len(lo) == len(mid) == len(hi)) or any(a > b for a, b in zip(lo, mid, strict=True)):
                raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
            if any(a > b for a, b in zip(mid, hi, strict=True)) or any(a < 1 for a in lo):
                raise RuntimeError("Shape provided for max is inconsistent with other shapes.")
            self.shapes[input] = (lo, mid, hi)

    here = [state.device.name, state.device.major, state.device.minor, state.device.sm_count]

    class ITimingCache:
        """Serialized as the magic, then JSON: the TensorRT build, the device it was timed on, and its entries."""

        def __init__(self, device: list, entries: int = 0) -> None:
            self.device, self.entries = list(device), entries

        def serialize(self) -> memoryview:
            body = {"trt": trt.__version__, "device": self.device, "entries": self.entries}
            return memoryview(TIMING_MAGIC + json.dumps(body).encode())

    class IBuilderConfig:
        def __init__(self, logger) -> None:
            self.logger = logger
            self.profiles: list[IOptimizationProfile] = []
            self.flags: set = set()
            self.pools: dict = {}
            self.cache: ITimingCache | None = None

        def set_memory_pool_limit(self, pool, pool_size) -> None:
            if not isinstance(pool, MemoryPoolType):
                raise TypeError("set_memory_pool_limit(): incompatible function arguments (pool)")
            self.pools[pool] = int(pool_size)

        def add_optimization_profile(self, profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag) -> None:
            if not isinstance(flag, BuilderFlag):
                raise TypeError("set_flag(): incompatible function arguments")
            self.flags.add(flag)

        def create_timing_cache(self, serialized_timing_cache) -> ITimingCache:
            data = bytes(serialized_timing_cache)
            if not data:
                return ITimingCache(here)
            try:
                if not data.startswith(TIMING_MAGIC):
                    raise ValueError("bad magic")
                body = json.loads(data[len(TIMING_MAGIC):])
                device, entries, version = list(body["device"]), int(body["entries"]), body["trt"]
            except (ValueError, KeyError, TypeError):
                self.logger.log(Severity.WARNING, "The timing cache is corrupted and will be ignored: a new one is "
                                                  "created.")
                return ITimingCache(here)
            if version != trt.__version__:
                self.logger.log(Severity.WARNING, f"The timing cache was created by TensorRT {version}, this is "
                                                  f"{trt.__version__}: it is ignored and a new one is created.")
                return ITimingCache(here)
            return ITimingCache(device, entries)

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            if not isinstance(cache, ITimingCache) or not isinstance(ignore_mismatch, bool):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            if cache.device != here:
                if not ignore_mismatch:
                    self.logger.log(Severity.ERROR, f"The timing cache was created on device {cache.device}, this "
                                                    f"is {here}: set ignore_mismatch to use it.")
                    return False
                self.logger.log(Severity.WARNING, "Using a timing cache from a device with different CUDA device "
                                                  "properties may lead to functional or performance bugs.")
            self.cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger
            if not state.gpu:
                raise TypeError("pybind11::init(): factory function returned nullptr (CUDA initialization failure "
                                "with error: 100. no CUDA-capable device is detected)")

        num_DLA_cores = 0  # noqa: N815 - TensorRT's own attribute

        def create_network(self, flags=0) -> INetworkDefinition:
            return INetworkDefinition(int(flags))

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig(self.logger)

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            typed_bit = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            strongly_typed = api != "10.3" or bool(network.flags & typed_bit)
            if api == "10.3" and strongly_typed and config.flags & {BuilderFlag.FP16, BuilderFlag.INT8}:
                self.logger.log(Severity.WARNING, "precision builder flags are ignored on a strongly typed network")
            if network.onnx is None:
                self.logger.log(Severity.ERROR, "Network has no layers")
                return None
            if not config.profiles:
                dynamic = [t.name for t in network.inputs if -1 in t.shape]
                if dynamic:
                    self.logger.log(Severity.ERROR, f"Network has dynamic inputs {dynamic} but no optimization profile")
                    return None
            profile = config.profiles[0].shapes if config.profiles else {}
            for tensor in network.inputs:
                shapes = profile.get(tensor.name)
                if shapes is None and -1 in tensor.shape:
                    self.logger.log(Severity.ERROR, f"{tensor.name}: dynamic input is missing a profile shape")
                    return None
                for dims in shapes or ():
                    if len(dims) != len(tensor.shape) or any(s not in (-1, d) for s, d in zip(tensor.shape, dims,
                                                                                              strict=True)):
                        self.logger.log(Severity.ERROR, f"{tensor.name}: profile {dims} does not fit the input "
                                                        f"shape {tuple(tensor.shape)}")
                        return None
            self.logger.log(Severity.WARNING, "stand-in: tactics not timed (this is not TensorRT)")
            if config.cache is not None:
                config.cache.entries += 1  # the layers' timings, as a real build adds them to an attached cache
            header = {"trt": trt.__version__, "device": [state.device.name, state.device.major, state.device.minor,
                                                         state.device.sm_count],
                      "profile": {k: [list(v) for v in dims] for k, dims in profile.items()},
                      "inputs": [[t.name, int(t.dtype), list(t.shape)] for t in network.inputs],
                      "outputs": [[t.name, int(t.dtype), list(t.shape)] for t in network.outputs]}
            head = json.dumps(header).encode()
            return memoryview(MAGIC + len(head).to_bytes(4, "little") + head + network.onnx)

    class IExecutionContext:
        def __init__(self, engine) -> None:
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape) -> bool:
            dims = _dims(shape)
            spec = self.engine.io.get(name)
            if spec is None or spec[0] != TensorIOMode.INPUT:
                return False
            lo, _, hi = (self.engine.profile.get(name) or [spec[2]] * 3)
            if len(dims) != len(spec[2]) or any(not (a <= d <= b) for a, d, b in zip(lo, dims, hi, strict=True)):
                self.engine.logger.log(Severity.ERROR, f"IExecutionContext::setInputShape: {name} {tuple(dims)} is "
                                                       f"outside the profile [{tuple(lo)}, {tuple(hi)}]")
                return False
            self.shapes[name] = dims
            return True

        def get_tensor_shape(self, name) -> _Dims:
            spec = self.engine.io[name]
            if spec[0] == TensorIOMode.INPUT:
                return self.shapes.get(name, spec[2])
            batch = next(iter(self.shapes.values()), (-1,))[0]
            return _dims([batch if i == 0 and d == -1 else d for i, d in enumerate(spec[2])])

        def set_tensor_address(self, name, memory) -> bool:
            if name not in self.engine.io or not isinstance(memory, int):
                return False
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle) -> bool:
            if not isinstance(stream_handle, int):
                raise TypeError("execute_async_v3(): incompatible function arguments: stream_handle must be an int")
            if stream_handle not in state.streams:
                return False
            engine = self.engine
            inputs = {}
            for name, (mode, dtype, _) in engine.io.items():
                if name not in self.addresses:
                    engine.logger.log(Severity.ERROR, f"tensor {name} has no address")
                    return False
                if mode == TensorIOMode.INPUT:
                    if name not in self.shapes:
                        engine.logger.log(Severity.ERROR, f"input {name} has no shape set")
                        return False
                    shape = self.shapes[name]
                    count = int(np.prod(shape)) * np.dtype(nptype(dtype)).itemsize
                    data = state.read(self.addresses[name], count)
                    inputs[name] = np.frombuffer(data, dtype=nptype(dtype)).reshape(shape)
            outputs = engine.session.run(None, inputs)
            for (name, (_, dtype, _)), value in zip(
                    ((n, s) for n, s in engine.io.items() if s[0] == TensorIOMode.OUTPUT), outputs, strict=True):
                value = np.ascontiguousarray(value, dtype=nptype(dtype))
                try:
                    state.write(self.addresses[name], value.tobytes())
                except ValueError as exc:
                    engine.logger.log(Severity.ERROR, f"output {name}: {exc}")
                    return False
            return True

    class ICudaEngine:
        def __init__(self, header: dict, onnx_bytes: bytes, logger) -> None:
            import onnxruntime as ort

            self.logger = logger
            self.io = {name: (TensorIOMode.INPUT, DataType(d), _dims(s)) for name, d, s in header["inputs"]}
            self.io.update({name: (TensorIOMode.OUTPUT, DataType(d), _dims(s)) for name, d, s in header["outputs"]})
            self.profile = {k: [_dims(v) for v in dims] for k, dims in header["profile"].items()}
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, index) -> str:
            return list(self.io)[index]

        def get_tensor_mode(self, name):
            return self.io[name][0] if name in self.io else TensorIOMode.NONE

        def get_tensor_shape(self, name) -> _Dims:
            return self.io[name][2]

        def get_tensor_dtype(self, name):
            return self.io[name][1]

        def get_tensor_profile_shape(self, name, profile_index) -> list[_Dims]:
            return list(self.profile[name]) if int(profile_index) == 0 else []

        device_memory_size_v2 = 1 << 20

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext(self)

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            data = bytes(serialized_engine)
            if not data.startswith(MAGIC):
                self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                                                "(Serialization assertion magicTagRead == kMAGIC_TAG failed.)")
                return None
            size = int.from_bytes(data[len(MAGIC): len(MAGIC) + 4], "little")
            try:
                header = json.loads(data[len(MAGIC) + 4: len(MAGIC) + 4 + size])
            except ValueError:
                self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: corrupt plan header")
                return None
            if header.get("trt") != trt.__version__:
                self.logger.log(Severity.ERROR, f"The engine plan file is not compatible with this version of "
                                                f"TensorRT, expecting library version {trt.__version__} got "
                                                f"{header.get('trt')}, please rebuild.")
                return None
            built_on = header.get("device") or [None, 0, 0, 0]
            if built_on[1:3] != here[1:3]:
                self.logger.log(Severity.ERROR, f"The engine plan file is generated on an incompatible device, "
                                                f"expecting compute {here[1]}.{here[2]} got compute "
                                                f"{built_on[1]}.{built_on[2]}, please rebuild.")
                return None
            if built_on != here:  # same compute capability, another device model: TensorRT only warns
                self.logger.log(Severity.WARNING, "Using an engine plan file across different models of devices is "
                                                  "not recommended and is likely to affect performance or even cause "
                                                  "errors.")
            try:
                return ICudaEngine(header, data[len(MAGIC) + 4 + size:], self.logger)
            except Exception as exc:  # noqa: BLE001 - a truncated plan: the real runtime logs and returns None
                self.logger.log(Severity.ERROR, f"IRuntime::deserializeCudaEngine: {exc}")
                return None

    for obj in (ILogger, Logger, DataType, nptype, TensorIOMode, MemoryPoolType, NetworkDefinitionCreationFlag,
                BuilderFlag, OnnxParser, Builder, Runtime, ITensor, INetworkDefinition, IBuilderConfig,
                IOptimizationProfile, ICudaEngine, IExecutionContext, ITimingCache):
        setattr(trt, obj.__name__, obj)
    trt.Dims = _Dims
    return trt


def install(monkeypatch, api: str = "10.3", *, device: Device | None = None, gpu: bool = True,
            version: str | None = None) -> types.ModuleType:
    """Put the stand-in ``tensorrt`` and cuda-python modules in ``sys.modules`` (undone by ``monkeypatch``).
    ``version``: the build the module reports (default :data:`FULL_VERSIONS` of ``api``), e.g. ``"10.13.3.9"`` for
    the TensorRT 10.x of JetPack 7, whose Python API is 10.3's."""
    state = _Cuda(device or Device(), gpu)
    trt = _tensorrt_module(api, state, version or FULL_VERSIONS[api])
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    runtime = _cudart_module(state, "cuda.bindings.runtime")
    bindings.runtime = runtime
    cuda.bindings = bindings
    modules = {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": runtime}
    if api == "10.3":  # cuda-python 12.x still has the cuda.cudart trampoline; cuda-bindings 13 removed it
        cuda.cudart = runtime
        modules["cuda.cudart"] = runtime
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    trt.__cuda_state__ = state
    return trt
