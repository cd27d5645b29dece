"""ONNX Runtime engine (CPU, and the CUDA/TensorRT providers where they exist).

"Building" means letting ONNX Runtime optimize the graph for this machine and saving the result in the cache under
the target key, so a restart loads the optimized model directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge_runtime.build.engines.base import TensorInfo
from edgeloop_core.errors import EdgeloopError, EngineError, InvalidInput

_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(int64)": "INT64",
    "tensor(int32)": "INT32", "tensor(int16)": "INT16", "tensor(int8)": "INT8", "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL",
}


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = {"cuda": ["CUDAExecutionProvider"], "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}
    chosen = [p for p in wanted.get(device, []) if p in available]
    return [*chosen, "CPUExecutionProvider"]


def build_ort(model_path: Path, engine_path: Path, device: str = "cpu") -> Path:
    """Optimize ``model_path`` for this machine and write the result atomically to ``engine_path``."""
    import onnxruntime as ort

    from edgeloop_core.files import atomic_output

    try:
        with atomic_output(engine_path) as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(model_path), options, providers=_providers(device))
    except EdgeloopError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise EngineError(f"ONNX Runtime could not build {model_path.name}: {exc}") from exc
    return engine_path


def usable_cores() -> int:
    """How many cores this process may run on: its CPU affinity (``taskset``, a cpuset, a pod's exclusive cores),
    not the machine's core count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS): the machine's count
        return os.cpu_count() or 1


def intra_op_threads(threads: int) -> int:
    """ONNX Runtime's intra-op thread count for the setting ``threads``: as set, or for 0 one per core this process
    may run on (:func:`usable_cores`). Never 0 itself: given 0, ONNX Runtime counts the machine's cores and pins one
    worker to each, past ``taskset`` and cpusets (a server pinned to one core then computes on another); given a
    count, it leaves every thread's affinity alone."""
    return threads if threads > 0 else usable_cores()


def spins(spin: bool | None) -> bool:
    """Whether ONNX Runtime's workers spin between runs: as set, else only where this process may use more than 4
    cores (fast on a big server, a burnt core on a small device)."""
    return spin if spin is not None else usable_cores() > 4


class OrtEngine:
    """An ONNX Runtime session over a (pre-optimized) ONNX file."""

    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, *, device: str = "cpu", max_batch_size: int = 64, threads: int = 0,
                 spin: bool | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = intra_op_threads(threads)
        options.inter_op_num_threads = 1  # sequential execution: no inter-op pool, and none to pin
        spinning = spins(spin)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        from edge_runtime.build.memory import resident_bytes

        before = resident_bytes()
        try:
            self._session = ort.InferenceSession(str(path), options, providers=_providers(device))
        except Exception as exc:
            raise EngineError(f"ONNX Runtime could not load {path.name}: {exc}") from exc
        after = resident_bytes()
        grown = (after - before) if before is not None and after is not None else 0
        self.memory_bytes = max(path.stat().st_size, grown)
        """What loading it took: the resident-set growth while the session was created, and at least the weights."""
        self.inputs = tuple(self._info(t) for t in self._session.get_inputs())
        self.outputs = tuple(self._info(t) for t in self._session.get_outputs())
        fixed = [t.shape[0] for t in self.inputs if t.shape and t.shape[0] > 0]
        self.max_batch_size = min([max_batch_size, *fixed])
        """The setting, or the batch the model fixes when it declares one (a fixed-batch import)."""

    @staticmethod
    def _info(arg) -> TensorInfo:  # noqa: ANN001 - onnxruntime NodeArg
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        return TensorInfo(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch; InvalidInput where ONNX Runtime blames the values (an index outside a table, say: the
        server checked names, types and shapes already), EngineError for anything else."""
        try:
            values = self._session.run(None, inputs)
        except Exception as exc:
            if type(exc).__name__ == "InvalidArgument":  # onnxruntime's own class, not importable by a stable name
                said = str(exc).split("Status Message: ", 1)[-1].strip()
                raise InvalidInput(f"ONNX Runtime refused the input: {said}") from exc
            raise EngineError(f"ONNX Runtime failed to run a batch: {exc}") from exc
        return {info.name: value for info, value in zip(self.outputs, values, strict=True)}

    def close(self) -> None:
        self._session = None
