"""The Python half of edgeloop's Triton backend (``backend.c``): runs inside ``tritonserver``, in the interpreter
the backend embeds, with numpy and onnxruntime only.

One :class:`Engine` per model instance loads the ONNX Runtime engine named by its version folder's ``engine.json``
(the engine file and the session options edgeloop wrote with the version: :func:`open_session`, which the
Python-backend model in ``model.py`` uses too). The backend hands :meth:`Engine.run` the
merged inputs of a formed batch as buffers with their shapes, and splits the outputs it returns back per request.
"""

import json
import os

import numpy as np
import onnxruntime as ort

# Triton's TRITONSERVER_DataType codes (tritonserver.h) of the config's TYPE_* names, with their numpy types
_TYPES = {"TYPE_BOOL": (1, np.bool_), "TYPE_UINT8": (2, np.uint8), "TYPE_UINT16": (3, np.uint16),
          "TYPE_UINT32": (4, np.uint32), "TYPE_UINT64": (5, np.uint64), "TYPE_INT8": (6, np.int8),
          "TYPE_INT16": (7, np.int16), "TYPE_INT32": (8, np.int32), "TYPE_INT64": (9, np.int64),
          "TYPE_FP16": (10, np.float16), "TYPE_FP32": (11, np.float32), "TYPE_FP64": (12, np.float64)}


def open_session(folder: str) -> ort.InferenceSession:
    """The ONNX Runtime session of the engine a version folder's ``engine.json`` names, with its session options
    (threads, spinning), as edgeloop's builtin engine reads the same settings."""
    with open(os.path.join(folder, "engine.json")) as f:
        engine = json.load(f)
    options = ort.SessionOptions()
    threads = int(engine.get("threads", 1))
    # 0 would let ONNX Runtime pin a worker to every core of the machine, past taskset and cpusets
    options.intra_op_num_threads = threads if threads > 0 else len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.inter_op_num_threads = 1  # sequential execution, as the builtin engine runs: no inter-op pool
    spin = "1" if engine.get("spin") else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return ort.InferenceSession(engine["engine"], options, providers=["CPUExecutionProvider"])


def failure(exc: Exception) -> tuple[bool, str]:
    """(the caller's fault, the message) of a run ONNX Runtime failed: an input it refuses (an index out of range,
    say) is the caller's fault, anything else is not."""
    return type(exc).__name__ == "InvalidArgument", f"ONNX Runtime: {exc}"


class Engine:
    """What the backend reads: ``inputs`` (names, in the order it passes buffers), ``outputs`` ((name, Triton type
    code) pairs, in the order :meth:`run` returns them) and ``batched`` (the first axis is the batch)."""

    def __init__(self, folder: str, model_config: str) -> None:
        config = json.loads(model_config)
        self.session = open_session(folder)
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [t["name"] for t in config["input"]]
        self._input_types = [_TYPES[t["data_type"]][1] for t in config["input"]]
        self.outputs = [(t["name"], _TYPES[t["data_type"]][0]) for t in config["output"]]
        self._output_names = [name for name, _ in self.outputs]
        self._output_types = [_TYPES[t["data_type"]][1] for t in config["output"]]

    def run(self, buffers: list, shapes: list) -> list | tuple:
        """The outputs (C-contiguous, of the configured types) for inputs given as raw buffers and their shapes; or
        ``(caller's fault, message)`` when ONNX Runtime fails the run (:func:`failure`)."""
        try:
            feed = {name: np.frombuffer(buffer, kind).reshape(shape)
                    for name, kind, buffer, shape in zip(self.inputs, self._input_types, buffers, shapes,
                                                         strict=True)}
            values = self.session.run(self._output_names, feed)
            return [np.ascontiguousarray(value, kind) for value, kind in zip(values, self._output_types, strict=True)]
        except Exception as exc:  # noqa: BLE001 - becomes the request's error; the server goes on
            return failure(exc)
