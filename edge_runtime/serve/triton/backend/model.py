"""Triton Python-backend model that runs an engine edgeloop built and validated (ONNX Runtime, on the CPU).

Triton copies nothing from edgeloop but this file and ``edgeloop_engine.py`` (how both backends open the engine):
it runs in Triton's Python stub, with numpy, onnxruntime and ``triton_python_backend_utils`` only. Each version
folder holds ``engine.json`` (the engine file and the session options), which edgeloop writes with the version, so
an older version folder always runs its own engine. Requests
that Triton's dynamic batcher hands over together run as one batch and are split back per request; when that run
fails, each runs alone, so only the request at fault gets an error (as in edgeloop's own batcher). Each answered
request is offered to field capture and field statistics (``edgeloop_tap.py``, copied beside this file too): a
few random draws on the request path; what they take goes to edgeloop's process off it.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from edgeloop_engine import failure, open_session  # copied beside this file
from edgeloop_tap import open_tap  # copied beside this file


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.session = open_session(os.path.join(args["model_repository"], args["model_version"]))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.tap = open_tap(args["model_name"], config)
        """Field capture and field statistics (``None``: edgeloop taps nothing here)."""

    def execute(self, requests: list) -> list:
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs}
                 for r in requests]
        answers = self._answers(feeds)
        if self.tap is not None:
            for request, feed, answer in zip(requests, feeds, answers, strict=True):
                if isinstance(answer, list):
                    self.tap.offer(request, feed, dict(zip(self.outputs, answer, strict=True)))
        return [self._respond(answer) if isinstance(answer, list) else answer for answer in answers]

    def _answers(self, feeds: list) -> list:
        """Per request: its outputs (a list, in ``self.outputs`` order), or its error response."""
        if not self.batched or len(feeds) == 1 or not self._mergeable(feeds):
            return [self._run_alone(feed) for feed in feeds]
        sizes = [len(feed[self.inputs[0]]) for feed in feeds]
        try:  # the merge too: a request the checks above let through must not fail the others
            merged = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.inputs}
            results = self.session.run(None, merged)
        except Exception:  # noqa: BLE001 - find the culprit: each request alone, so only it fails
            return [self._run_alone(feed) for feed in feeds]
        answers, offset = [], 0
        for size in sizes:
            answers.append([value[offset: offset + size] for value in results])
            offset += size
        return answers

    def _mergeable(self, feeds: list) -> bool:
        """Whether the requests can run as one batch: every input of every request has a batch axis, the same one
        within a request, and each input the same non-batch shape in all of them (else each runs alone)."""
        for feed in feeds:
            if any(feed[name].ndim < 1 for name in self.inputs):
                return False
            if len({len(feed[name]) for name in self.inputs}) > 1:
                return False
        return all(len({feed[name].shape[1:] for feed in feeds}) == 1 for name in self.inputs)

    def _run_alone(self, feed: dict) -> object:
        """One request's outputs, or its own error response: INVALID_ARG where ONNX Runtime blames the input (an
        index out of range, say), INTERNAL otherwise."""
        try:
            return list(self.session.run(None, feed))
        except Exception as exc:  # noqa: BLE001 - becomes this request's error, the others are answered
            fault, message = failure(exc)
            code = pb_utils.TritonError.INVALID_ARG if fault else pb_utils.TritonError.INTERNAL
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _respond(self, values: list) -> object:
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(value))
                                           for name, value in zip(self.outputs, values, strict=True)])

    def finalize(self) -> None:
        if self.tap is not None:
            self.tap.close()
        self.session = None
