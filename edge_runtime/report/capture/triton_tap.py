"""Field capture and field statistics with ``serving_engine: triton``: the runtime's half (docs/capture.md).

Apps call Triton directly, so edgeloop's servicer never sees their requests; the Python-backend model that runs
edgeloop's ONNX Runtime engines inside Triton does (``serve/triton/backend/edgeloop_tap.py``). This tap

* publishes, twice a second and only when they change, each served model's rates in ``tap.json`` (in the
  tritonserver's private :attr:`~edge_runtime.serve.triton.dataplane.TritonServer.tap_dir`): the capture policy's
  sample rate (the drift burst's while one lasts), whether it has hard-example rules, and the field statistics'
  rate (0 for a model without a field baseline), and whether a classifier's answers to requests with an id are
  remembered (feedback accuracy). The stub samples with these, on the request path;
* listens on ``tap.sock`` there (a Unix socket: only this user reaches it) and hands each request the stub sends to
  :meth:`~edge_runtime.report.capture.worker.FieldCapture.offer` and
  :meth:`~edge_runtime.report.field.FieldStatistics.observe` with the stub's own draws, so sampling is decided once
  and rules, budgets, the spool, uploads and counts are those of the builtin server;
* says once per model, in the log and in :meth:`unavailable` (the stats event's ``capture.unavailable``), when Triton
  serves a model with a backend edgeloop's code does not run in (a TensorRT plan, Triton's native ``onnxruntime``
  backend, edgeloop's C backend): nothing of it can be captured or counted there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.serve.triton.dataplane import TAP_MODULE, served_backend
from edgeloop_core.drift import CLASSIFIER_KINDS
from edgeloop_core.files import write_atomic
from edgeloop_core.protos import inference_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from edge_runtime.report.capture.worker import FieldCapture
    from edge_runtime.report.field import FieldStatistics
    from edge_runtime.serve.slot import ServingModel
    from edge_runtime.serve.triton.dataplane import TritonServer

log = logging.getLogger(__name__)

PUBLISH_S = 0.5
"""How often the rates are worked out (written only when they change), seconds."""


def _frames() -> Any:  # noqa: ANN401 - the stub's module: one definition of the frame format for both halves
    spec = importlib.util.spec_from_file_location("edgeloop_tap", TAP_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FRAMES = _frames()


class TritonTap:
    """The runtime's end of the taps of ``server``'s Python-backend models; ``models`` gives each served model
    (name → the one that serves, or ``None``), ``capture`` and ``field`` take what they answered (either may be
    ``None``: off)."""

    def __init__(self, server: TritonServer, models: Callable[[], dict[str, ServingModel | None]],
                 capture: FieldCapture | None, field: FieldStatistics | None) -> None:
        self.server, self.models, self.capture, self.field = server, models, capture, field
        self.delivered = 0
        """Requests handed to capture or field statistics (tests, benchmarks)."""
        self.stale = 0
        """Requests a version that no longer serves answered (during a swap): not delivered."""
        self._unavailable: dict[str, str] = {}
        self._published: dict[str, Any] | None = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._folder: Path | None = None

    def start(self) -> None:
        """Listen on ``tap.sock`` and start publishing the rates (after tritonserver started: its folder exists).
        A socket that cannot be made is logged, and Triton serves without capture (serving is the job)."""
        assert self.server.tap_dir is not None, "start tritonserver first"
        self._folder = self.server.tap_dir
        path = self._folder / FRAMES.SOCKET
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.unlink(missing_ok=True)  # a previous runtime's
            listener.bind(str(path))
            listener.listen(16)
        except OSError as exc:
            listener.close()
            log.error("capture and field statistics of Triton's models are off: no socket at %s: %s", path, exc)
            return
        self._listener = listener
        for target, name in ((self._accept, "edgeloop-tap-accept"), (self._publish_forever, "edgeloop-tap-rates")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop listening and publishing; the folder goes (tritonserver is stopped with the runtime)."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=2.0)
        if self._folder is not None:
            for name in (FRAMES.SOCKET, FRAMES.CONFIG):
                (self._folder / name).unlink(missing_ok=True)

    def unavailable(self) -> dict[str, str]:
        """Model → why nothing of it is captured or counted (it is served where edgeloop's code does not run)."""
        return dict(self._unavailable)

    # --- the rates the stubs sample with
    def _publish_forever(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            try:
                self.publish()
            except Exception:  # a background loop reports and goes on
                log.exception("could not publish the capture rates to Triton's models")

    def publish(self) -> dict[str, Any]:
        """Work out every served model's rates and write ``tap.json`` when they changed; returns them."""
        bursts = self.capture.bursts() if self.capture is not None else {}
        policies = self.capture.policies if self.capture is not None else {}
        rates: dict[str, dict[str, Any]] = {}
        for name, serving in self.models().items():
            policy = policies.get(name)
            capture = max([policy.sample_rate, bursts.get(name, {}).get("sample_rate", 0.0)]) if policy else 0.0
            rules = policy is not None and policy.hard_examples is not None
            if serving is None:
                continue
            counted = self.field is not None
            field = self.field.rate if counted and serving.manifest.field_baseline is not None else 0.0
            remember = counted and serving.manifest.task.kind in CLASSIFIER_KINDS  # feedback accuracy
            if (capture or rules or field or remember) and self._tapped(name, bool(capture or rules),
                                                                        bool(field or remember)):
                rates[name] = {"capture": capture, "rules": rules, "field": field, "remember": remember}
        published = {"models": rates}
        if published != self._published and self._folder is not None:
            write_atomic(self._folder / FRAMES.CONFIG, json.dumps(published).encode())
            self._published = published
        return published

    def _tapped(self, name: str, capture: bool, field: bool) -> bool:
        """Whether Triton serves ``name`` with the Python backend (where the tap runs); else said once (per model
        and backend) in the log and in :meth:`unavailable`."""
        backend = served_backend(self.server.repo, name)
        if backend == "python":
            self._unavailable.pop(name, None)
            return True
        what = " and ".join(w for w, on in (("capture", capture), ("field statistics", field)) if on)
        how = ("set EDGE_TRITON_BACKEND=python to serve ONNX Runtime engines with Triton's Python backend, where "
               "they are" if backend in ("onnxruntime", "edgeloop") else "serve it with serving_engine builtin to "
               "have them")
        reason = f"Triton serves {name} with its {backend} backend, where edgeloop sees no request: no {what} ({how})"
        if self._unavailable.get(name) != reason:
            log.warning("%s", reason)
            self._unavailable[name] = reason
        return False

    # --- what the stubs send
    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("the Triton tap could not accept a connection")
                self._stop.wait(1.0)
                continue
            threading.Thread(target=self._receive, args=(conn,), name="edgeloop-tap-conn", daemon=True).start()

    def _receive(self, conn: socket.socket) -> None:
        """Deliver one stub's frames until it hangs up; a frame that does not parse ends the connection (said once,
        without its contents)."""
        with conn:
            while not self._stop.is_set():
                try:
                    frame = _read_frame(conn)
                    if frame is None:
                        return
                    self.deliver(*FRAMES.decode(*frame))
                except Exception as exc:  # noqa: BLE001 - one stub's bad frame must not stop the others
                    log.warning("the Triton tap drops a connection: %s", type(exc).__name__ if not isinstance(
                        exc, ValueError) else exc)
                    return

    def deliver(self, header: dict[str, Any], inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Hand one request a stub sent to capture and field statistics, with the stub's draws."""
        name = str(header["model"])
        serving = self.models().get(name)
        dropped = header.get("dropped") or {}
        if self.capture is not None and dropped.get("capture"):
            self.capture.metrics.dropped.labels(name, "queue_full").inc(int(dropped["capture"]))
        if self.field is not None and dropped.get("field"):
            self.field.dropped += int(dropped["field"])
        if serving is None or serving.version != header["version"]:
            self.stale += 1
            return
        request = pb.ModelInferRequest(model_name=name, id=str(header.get("id") or ""))
        for key, value in (header.get("parameters") or {}).items():
            if isinstance(value, bool):
                request.parameters[key].bool_param = value
            elif isinstance(value, int):
                request.parameters[key].int64_param = value
            else:
                request.parameters[key].string_param = str(value)
        if self.capture is not None and header.get("capture") is not None:
            self.capture.offer(request, serving, inputs, outputs, draw=float(header["capture"]))
        if self.field is not None and (header.get("field") is not None or header.get("remember")):
            draw = 1.0 if header.get("field") is None else float(header["field"])  # 1.0: remembered, not counted
            self.field.observe(request, serving, inputs, outputs, draw=draw)
        self.delivered += 1


def _read_frame(conn: socket.socket) -> tuple[bytes, bytes] | None:
    """(header, body) of the next frame; ``None`` when the stub hung up between frames; ValueError for one that
    is too large (or cut short)."""
    prefix = _read_exactly(conn, FRAMES.PREFIX.size, eof_ok=True)
    if prefix is None:
        return None
    head_bytes, body_bytes = FRAMES.PREFIX.unpack(prefix)
    if head_bytes > FRAMES.MAX_HEADER_BYTES or body_bytes > FRAMES.MAX_BODY_BYTES:
        raise ValueError(f"a tap frame of {head_bytes} + {body_bytes} bytes is over the limits")
    head = _read_exactly(conn, head_bytes)
    body = _read_exactly(conn, body_bytes)
    assert head is not None and body is not None
    return head, body


def _read_exactly(conn: socket.socket, size: int, *, eof_ok: bool = False) -> bytes | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = conn.recv_into(view[got:])
        if n == 0:
            if eof_ok and got == 0:
                return None
            raise ValueError("a tap frame was cut short")
        got += n
    return bytes(buffer)


def served_models(repository: Any) -> Callable[[], dict[str, ServingModel | None]]:  # noqa: ANN401 - ModelRepository
    """Each of ``repository``'s models with the version that serves it (``None`` while none does)."""
    return lambda: {name: runtime.serving for name, runtime in list(repository.runtimes.items())}
