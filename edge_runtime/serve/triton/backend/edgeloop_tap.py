"""Field capture and field statistics of a model Triton's Python backend serves (engine triton): the stub's half.

Runs in Triton's Python stub beside ``model.py``, with numpy and the standard library only (the runtime reads the
same frames with :func:`decode`). For each answered request :meth:`Tap.offer` draws the two uniform numbers that
sample it (one for capture, one for field statistics) against the rates the runtime publishes in ``tap.json`` (in
the folder ``EDGELOOP_TRITON_TAP`` names; re-read when it changes, looked at twice a second). When either draw
samples it, or the model's capture policy has hard-example rules (the runtime judges those, as it does for the
builtin server), the request's inputs and outputs are copied and queued (its outputs alone when a classifier's
request with an id is only to be remembered for feedback accuracy); a full queue drops and counts, it never
waits. A sender thread hands what is queued over a Unix socket (``tap.sock``) to edgeloop's process, which gives it,
with its draws, to the same capture worker and field statistics as the builtin server's requests
(``edge_runtime/report/capture/triton_tap.py``). Nothing of it ever reaches a log.

Frame: ``!II`` (header length, body length, bytes), a JSON header, then the tensors' bytes in header order.
"""

import json
import os
import queue
import random
import socket
import struct
import threading
import time

import numpy as np

ENV = "EDGELOOP_TRITON_TAP"
"""The environment variable (set for tritonserver by edgeloop) naming the folder with ``tap.sock`` and ``tap.json``."""
SOCKET, CONFIG = "tap.sock", "tap.json"
QUEUE_ITEMS = 256
"""Requests waiting for the sender, at most; more are dropped and counted."""
LOOK_S = 0.5
"""How often the published rates are looked at (one ``stat``), seconds."""
INTERNAL_REQUEST_ID = "edgeloop:internal"
"""The request id of the runtime's own requests to a serving model (the batch sweep, energy figures): never tapped."""
PREFIX = struct.Struct("!II")
MAX_HEADER_BYTES = 1 << 20
MAX_BODY_BYTES = 1 << 30


def encode(header: dict, tensors: list) -> bytes:
    """One frame: ``header`` (JSON) with ``tensors`` (``(kind, name, dtype.str, shape, bytes)``) described in it as
    ``[kind, name, dtype, shape, nbytes]`` and their bytes after it."""
    header = {**header, "tensors": [[kind, name, dtype, list(shape), len(data)]
                                    for kind, name, dtype, shape, data in tensors]}
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(data for *_, data in tensors)
    return PREFIX.pack(len(head), len(body)) + head + body


def decode(head: bytes, body: bytes) -> tuple:
    """``(header, inputs, outputs)`` of a frame (tensors as numpy arrays viewing ``body``); ValueError, in one line,
    for a frame that does not describe its body (a number type numpy has not, sizes that do not add up)."""
    header = json.loads(head)
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ValueError("a tap frame's header is not an object with tensors")
    found: dict = {"input": {}, "output": {}}
    offset = 0
    for kind, name, dtype, shape, nbytes in header["tensors"]:
        try:
            kind_of = np.dtype(dtype)
        except TypeError:
            kind_of = np.dtype(object)  # refused below, in the same words
        if kind not in found or kind_of.kind not in "biuf" or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"a tap frame carries a tensor it cannot: {kind} {name} {dtype} {shape}")
        if int(np.prod(shape, dtype=np.int64)) * kind_of.itemsize != nbytes or offset + nbytes > len(body):
            raise ValueError(f"a tap frame's tensor {name} does not match its bytes")
        found[kind][str(name)] = np.frombuffer(body, kind_of, nbytes // kind_of.itemsize, offset).reshape(shape)
        offset += nbytes
    if offset != len(body):
        raise ValueError("a tap frame has bytes no tensor describes")
    return header, found["input"], found["output"]


def _tensors(kind: str, arrays: dict) -> list:
    """Copies of ``arrays`` (C order) as :func:`encode` takes them: the request's own buffers go back to Triton."""
    return [(kind, name, np.asarray(a).dtype.str, np.shape(a), np.ascontiguousarray(a).tobytes())
            for name, a in arrays.items()]


class Tap:
    """Model ``model`` (version ``version``, edgeloop's name) of one stub: :meth:`offer` on the request path, a
    sender thread behind it."""

    def __init__(self, folder: str, model: str, version: str) -> None:
        self.folder, self.model, self.version = folder, model, version
        self.rates = (0.0, False, 0.0, False)
        """(capture sample rate, capture has hard-example rules, field statistics rate, remember what a request
        with an id was answered: feedback accuracy) the runtime published."""
        self.dropped = {"capture": 0, "field": 0}
        """Requests dropped since the last frame (queue full, or the runtime did not take them)."""
        self._seen = None
        self._look_at = 0.0
        self._queue = queue.Queue(QUEUE_ITEMS)
        self._thread = threading.Thread(target=self._send, name="edgeloop-tap", daemon=True)
        self._thread.start()

    def offer(self, request: object, inputs: dict, outputs: dict) -> None:
        """Consider one answered request (``request``: Triton's ``InferenceRequest``); returns at once, never
        raises, never waits."""
        try:
            if time.monotonic() >= self._look_at:
                self._look()
            capture_rate, rules, field_rate, remember = self.rates
            capture, field, request_id = random.random(), random.random(), request.request_id()
            if request_id == INTERNAL_REQUEST_ID:  # the runtime's own (batch sweep, energy): not the field
                return
            for_capture, for_field = capture < capture_rate or rules, field < field_rate
            for_remember = remember and bool(request_id)
            if not (for_capture or for_field or for_remember):
                return
            header = {"model": self.model, "version": self.version, "id": request_id,
                      "parameters": json.loads(request.parameters() or "{}") if for_capture else {},
                      "capture": capture if for_capture else None, "field": field if for_field else None,
                      "remember": for_remember}
            given = _tensors("input", inputs) if for_capture or for_field else []  # remembering needs outputs only
            item = (header, given + _tensors("output", outputs))
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self._count_dropped(header)
        except Exception:  # noqa: BLE001 - observing must never fail a request
            pass

    def _count_dropped(self, header: dict) -> None:
        for what in ("capture", "field"):
            if header[what] is not None:
                self.dropped[what] += 1

    def _look(self) -> None:
        """Re-read the published rates when ``tap.json`` changed (none published: nothing is offered)."""
        self._look_at = time.monotonic() + LOOK_S
        path = os.path.join(self.folder, CONFIG)
        try:
            seen = os.stat(path).st_mtime_ns
        except OSError:
            self.rates, self._seen = (0.0, False, 0.0, False), None
            return
        if seen != self._seen:
            with open(path) as f:
                rates = json.load(f).get("models", {}).get(self.model, {})
            self.rates = (float(rates.get("capture", 0.0)), bool(rates.get("rules", False)),
                          float(rates.get("field", 0.0)), bool(rates.get("remember", False)))
            self._seen = seen

    def _send(self) -> None:
        """The sender: one connection to the runtime, made again when it breaks (at most five tries a second); an
        item it cannot hand over is dropped and counted, and told with the next frame that goes through."""
        sock, retry_at = None, 0.0
        while (item := self._queue.get()) is not None:
            header, tensors = item
            header["dropped"], self.dropped = self.dropped, {"capture": 0, "field": 0}
            try:
                if sock is None and time.monotonic() >= retry_at:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(os.path.join(self.folder, SOCKET))
                if sock is not None:
                    sock.sendall(encode(header, tensors))
                    continue
            except OSError:
                if sock is not None:
                    sock.close()
                sock, retry_at = None, time.monotonic() + 0.2
            for what, n in header["dropped"].items():  # still to be told, with this one
                self.dropped[what] += n
            self._count_dropped(header)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Stop the sender after what is queued (the stub is finalized)."""
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            return
        self._thread.join(timeout=2.0)


def open_tap(model: str, config: dict) -> "Tap | None":
    """The tap of Triton model ``model`` (its parsed ``config.pbtxt``), or ``None`` where edgeloop taps nothing:
    no ``EDGELOOP_TRITON_TAP``, or a candidate being validated (its requests are the validation set, not the
    field)."""
    folder = os.environ.get(ENV)
    version = config.get("parameters", {}).get("edgeloop_version", {}).get("string_value")
    if not folder or "__" in model or not version:
        return None
    return Tap(folder, model, version)
