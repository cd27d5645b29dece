"""``edgeloop edge serve``: wire settings, device facts, the life cycle, the gRPC server, metrics and telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.build.device import DeviceFacts, detect
from edge_runtime.lifecycle import ModelRuntime
from edge_runtime.report.capture import CaptureMetrics, FieldCapture, Uploader
from edge_runtime.report.capture.service import SERVICE_NAME as CAPTURE_SERVICE
from edge_runtime.report.capture.service import add_capture_service
from edge_runtime.report.capture.triton_tap import TritonTap, served_models
from edge_runtime.report.field import FieldStatistics
from edge_runtime.report.jetson import JetsonSensors
from edge_runtime.report.metrics import RuntimeMetrics
from edge_runtime.report.telemetry import Outbox, TelemetrySender
from edge_runtime.repository import ModelRepository
from edge_runtime.serve import observers
from edge_runtime.serve.server import start_server
from edge_runtime.serve.servicer import RepositoryControl
from edge_runtime.settings import EdgeSettings
from edgeloop_core.contract.captures import CaptureLayout
from edgeloop_core.errors import ConfigError, EdgeloopError
from edgeloop_core.tls import HubTls, TlsFiles

log = logging.getLogger("edgeloop.edge")


@dataclass
class EdgeApp:
    """Everything one device runs. ``start()`` returns once the gRPC server listens (the model may still load)."""

    settings: EdgeSettings
    facts: DeviceFacts | None = None
    store: Any = None
    grpc_port: int = 0
    """The inference port apps call: edgeloop's server, or Triton's with ``serving_engine`` triton."""
    control_port: int = 0
    """edgeloop's own gRPC server (health, readiness, repository control): the inference port itself with the
    builtin engine, ``control_port`` with Triton."""
    repository: ModelRepository | None = None
    outbox: Outbox | None = None
    sender: TelemetrySender | None = None
    metrics: RuntimeMetrics = field(default_factory=RuntimeMetrics)
    latencies_ms: dict[str, deque] = field(default_factory=dict)
    """Model name → ModelInfer latencies (ms) since the last stats event."""
    sensors: JetsonSensors = field(default_factory=JetsonSensors)
    node: Any = None
    _server: Any = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _pending: set = field(default_factory=set)
    telemetry_errors: int = 0
    _facts: dict[str, Any] = field(default_factory=dict)
    outbox_error: str = ""
    """Why the outbox could not be opened at start (empty once it is open): telemetry waits, serving does not."""
    capture: FieldCapture | None = None
    """Field capture (docs/capture.md): ``None`` when its spool could not be opened (logged; serving goes on)."""
    uploader: Uploader | None = None
    field: FieldStatistics | None = None
    """Field statistics for drift (what each model serves, in its baseline's bins), counted off the request path."""
    tap: TritonTap | None = None
    """Capture and field statistics of the models Triton's Python backend serves (engine triton)."""

    @property
    def runtime(self) -> ModelRuntime | None:
        """The life cycle of the one model this device serves (the simple case; with several, name one through
        ``repository.runtime(name)``)."""
        return self.repository.only() if self.repository is not None else None

    def report(self, kind: str, payload: dict[str, Any]) -> None:
        """Queue a telemetry event (and log it); a model's events carry ``model_name``. Never raises: a full disk or
        a broken outbox must not stop serving or reconciling; what could not be queued is logged and counted
        (``telemetry_errors``)."""
        log.info("%s %s", kind, payload)
        if self.outbox is None:  # not open yet (said once, when it failed): the event is lost, and counted
            self.telemetry_errors += 1
            return
        try:
            self.outbox.add(kind, payload)
            if self.sender is not None:
                self.sender.wake()
        except Exception as exc:  # noqa: BLE001 - telemetry is best effort; the device's work is not
            self.telemetry_errors += 1
            log.error("could not queue the %s event (%d so far): %s", kind, self.telemetry_errors, exc)

    def alive(self) -> bool:
        """Liveness: the life-cycle loops run and none is wedged (a dead or stuck loop restarts the pod)."""
        loop_task = next((t for t in self._tasks if t.get_name() == "edgeloop-lifecycle"), None)
        if loop_task is not None and loop_task.done():
            return False
        return (self.repository is not None and self.repository.loops_alive()
                and not self.repository.wedged())

    def _on_result(self, method: str, code: str, seconds: float, model: str) -> None:
        if method.endswith("/ModelInfer"):
            if self.repository is None or model not in self.repository.runtimes:
                model = ""  # an unknown name must not mint label values
            self.metrics.requests.labels(model, code).inc()
            if code == "OK":
                self.metrics.latency.labels(model).observe(seconds)
                self.latencies_ms.setdefault(model, deque(maxlen=4096)).append(seconds * 1e3)

    def _on_change(self) -> None:
        assert self.repository is not None
        for name, runtime in list(self.repository.runtimes.items()):
            validation = runtime.last_validation
            self.metrics.set_state(name, runtime.state, runtime.ready(),
                                   validation.value if validation else None)
            serving = runtime.serving
            self.metrics.set_energy(name, serving.plan.variant.name if serving else None, runtime.mj_per_inference())
        self.metrics.ready.set(1.0 if self.repository.ready() else 0.0)

    def _annotate_node(self) -> None:
        if self.node is None or self.repository is None:
            return
        status = self.repository.status()

        def annotate() -> None:
            try:
                self.node.report(status)
            except EdgeloopError as exc:
                log.warning("could not annotate node %s: %s", self.settings.kube_node_name, exc)

        task = asyncio.get_running_loop().run_in_executor(None, annotate)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def start(self) -> None:
        tls = self._tls()  # a bad TLS setting fails before anything starts
        self.facts = self.facts or await asyncio.to_thread(
            detect, self.settings.tegra_release_file, self.settings.device_model_file, self.settings.device_module)
        outbox = await asyncio.to_thread(self._open_outbox)
        if outbox is not None:
            self._use_outbox(outbox)
        self.repository = ModelRepository(self.settings, self.facts, store=self.store, report=self.report,
                                          on_batch=self.metrics.observe_batch)
        self.repository.on_change(self._on_change)
        labels = await self._read_node() if self.settings.kube_node_name else {}
        self._facts = {"facts": self.facts.to_dict(), "node_labels": labels}
        self.report("facts", self._facts)
        triton = self.repository.triton
        if triton is not None:
            await self.repository.start_triton()  # before any model loads; a Triton that cannot start fails here
        await asyncio.to_thread(self._start_capture)
        self._start_field_statistics()
        if triton is not None:  # apps call Triton: its Python-backend models hand what they answer to the tap
            self.tap = TritonTap(triton, served_models(self.repository), self.capture, self.field)
            self.tap.start()
            self.repository.on_change(self.tap.publish)  # a version that starts serving is tapped from then on
        control = self._control()
        try:
            self._server, self.control_port = await start_server(
                self.repository, bind_address=self.settings.bind_address,
                port=self.settings.control_port if triton is not None else self.settings.grpc_port,
                max_batch_size=self.settings.max_request_batch_size, max_message_bytes=self.settings.max_message_bytes,
                on_result=self._on_result, tls=tls, alive=self.alive,
                shm_release_after_s=self.settings.shm_release_after_s, health_port=self.settings.health_port,
                control=control, services=self._capture_service(control))
        except BaseException:
            if triton is not None:  # nothing may outlive a start that failed
                await asyncio.to_thread(triton.stop)
            await asyncio.to_thread(self._stop_capture)
            raise
        self.grpc_port = triton.grpc_port if triton is not None else self.control_port
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.bind_address, self.settings.metrics_port)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.repository.run_forever(), name="edgeloop-lifecycle"))
        self._tasks.append(loop.create_task(self._stats_forever(), name="edgeloop-stats"))
        if self.sender is not None:
            self._tasks.append(loop.create_task(self.sender.run_forever(), name="edgeloop-telemetry"))
        if self.outbox is None:
            self._tasks.append(loop.create_task(self._open_outbox_later(), name="edgeloop-outbox"))

    async def _read_node(self) -> dict[str, str]:
        """The node's labels (the module from ``edgeloop.io/module`` where the device tree does not say it), and
        node annotations from now on; without Kubernetes, ``{}`` and a warning (the runtime serves anyway)."""
        from edge_runtime.report.kube import NodeReporter

        assert self.repository is not None and self.facts is not None
        labels: dict[str, str] = {}
        try:
            self.node = await asyncio.to_thread(NodeReporter, self.settings.kube_node_name)
            labels = await asyncio.to_thread(self.node.labels)
            if self.facts.module is None and labels.get("edgeloop.io/module"):
                from dataclasses import replace

                from edgeloop_core.contract.target import module_slug

                self.facts = replace(self.facts, module=module_slug(labels["edgeloop.io/module"]))
                self.repository.facts = self.facts
        except EdgeloopError as exc:  # the runtime serves without Kubernetes; it says so once
            log.warning("node annotations disabled: %s", exc)
            self.node = None
        self.repository.on_change(self._annotate_node)
        return labels

    def _control(self) -> RepositoryControl:
        """Who may control the repository (and label captures): the settings' switch, token and client names."""
        s = self.settings
        return RepositoryControl(s.repository_control, s.control_token.get_secret_value() if s.control_token else None,
                                 frozenset(s.control_client_names))

    def _start_capture(self) -> None:
        """Open the capture spool under ``cache_dir/capture`` (finishing what a kill interrupted), start its worker
        and uploader, and let it see every answered ModelInfer (runs in a worker thread). A spool that cannot be
        opened is logged and the device serves without capture."""
        assert self.repository is not None
        s = self.settings
        metrics = CaptureMetrics(self.metrics.registry)
        capture = FieldCapture(s.cache_dir / "capture", s.device_id, self.repository.desired.capture_configuration,
                               metrics)
        try:
            capture.start()
        except Exception as exc:  # noqa: BLE001 - capture is an extra; serving is the job
            log.error("field capture is off: its spool under %s cannot be opened: %s", s.cache_dir / "capture", exc)
            return
        assert capture.spool is not None
        self.capture = capture
        self.uploader = Uploader(capture.spool, self.repository.shared.store, CaptureLayout(s.s3_prefix),
                                 s.device_id, metrics, retry_initial_s=s.retry_initial_s, retry_max_s=s.retry_max_s)
        capture.on_ready = self.uploader.wake.set
        self.uploader.start()
        observers.attach(self.repository, capture.offer)

    def _start_field_statistics(self) -> None:
        """Count a share of what each model serves into its baseline's bins (:mod:`edge_runtime.report.field`)."""
        assert self.repository is not None
        if self.settings.field_stats_rate > 0:
            self.field = FieldStatistics(self.settings.field_stats_rate, self.settings.field_stats_min_samples,
                                         registry=self.metrics.registry)
            if self.capture is not None:  # drift bursts: capture compares the counts off the request path
                self.field.listeners.append(self.capture.field_counts)
            self.field.start()
            observers.attach(self.repository, self.field.observe)

    def _capture_service(self, control: RepositoryControl) -> list[tuple[str, Any]]:
        """The Label RPC on the device's endpoint, under repository control's access rules (none without capture)."""
        capture = self.capture
        if capture is None:
            return []
        feedback = self.field.feedback if self.field is not None else None  # feedback accuracy (report/field.py)
        return [(CAPTURE_SERVICE, lambda server: add_capture_service(server, capture, control, feedback))]

    def _stop_capture(self) -> None:
        """Stop seeing requests, commit what is queued, stop the worker and the uploader (blocking: a thread)."""
        if self.tap is not None:
            self.tap.stop()
            self.tap = None
        if self.repository is not None and self.capture is not None:
            observers.detach(self.repository, self.capture.offer)
        if self.capture is not None:
            self.capture.stop()
        if self.uploader is not None:
            self.uploader.stop()
        if self.field is not None:
            if self.repository is not None:
                observers.detach(self.repository, self.field.observe)
            self.field.stop()

    def capture_stats(self) -> dict[str, Any]:
        """Field capture's figures for the stats event: captured, dropped by reason, uploaded, spool bytes."""
        if self.capture is None:
            return {"enabled": False}
        metrics = self.capture.metrics
        totals: dict[str, dict[str, float]] = {"captured": {}, "dropped": {}, "uploaded": {}}
        for family in metrics.registry.collect():
            kind = {"edgeloop_capture_items": "captured", "edgeloop_capture_dropped": "dropped",
                    "edgeloop_capture_uploaded": "uploaded"}.get(family.name)
            for sample in family.samples if kind else ():
                if sample.name.endswith("_total"):
                    key = sample.labels.get("reason") or sample.labels.get("kind") or sample.labels.get("model", "")
                    totals[kind][key] = totals[kind].get(key, 0.0) + sample.value
        return {"enabled": True, **totals, "bursts": self.capture.bursts(),
                "unavailable": self.tap.unavailable() if self.tap is not None else {},
                "spool_bytes": metrics.value("edgeloop_capture_spool_bytes"),
                "upload_error": self.uploader.failing if self.uploader is not None else ""}

    def _open_outbox(self) -> Outbox | None:
        """The telemetry outbox, or ``None`` when it cannot be opened now (a full disk, say): logged, and the
        reason kept in ``outbox_error``; the device serves without it (runs in a worker thread)."""
        path = self.settings.cache_dir / "telemetry-outbox.sqlite"
        try:
            return Outbox(path, self.settings.device_id, max_events=self.settings.outbox_max_events)
        except EdgeloopError as exc:
            if not self.outbox_error:  # once, not at every retry
                log.error("%s; serving goes on without telemetry (events are counted as telemetry_errors) and the "
                          "outbox is retried in the background", exc)
            self.outbox_error = str(exc)
            return None

    def _use_outbox(self, outbox: Outbox) -> None:
        """Queue telemetry in ``outbox`` from now on, and forward it to the hub when one is set (event loop)."""
        self.outbox, self.outbox_error = outbox, ""
        if self.settings.hub_address:
            token = self.settings.hub_token.get_secret_value() if self.settings.hub_token else None
            hub_tls = HubTls(self.settings.hub_tls_ca_file, self.settings.hub_tls_cert_file,
                             self.settings.hub_tls_key_file) if self.settings.hub_tls_ca_file else None
            self.sender = TelemetrySender(outbox, self.settings.hub_address, token,
                                          interval_s=self.settings.telemetry_interval_s, tls=hub_tls)

    async def _open_outbox_later(self) -> None:
        """Retry the outbox that could not be opened at start, with back-off (``retry_initial_s`` doubling up to
        ``retry_max_s``, seconds); once it opens, say so (log and an ``outbox_opened`` event with the events lost
        meanwhile), send the device's facts again and start forwarding."""
        delay = self.settings.retry_initial_s
        while True:
            await asyncio.sleep(delay)
            outbox = await asyncio.to_thread(self._open_outbox)
            if outbox is not None:
                break
            delay = min(delay * 2, self.settings.retry_max_s)
        lost = self.telemetry_errors
        self._use_outbox(outbox)
        log.warning("telemetry outbox opened under %s: telemetry resumes (%d events were lost meanwhile)",
                    self.settings.cache_dir, lost)
        self.report("outbox_opened", {"events_lost": lost})
        self.report("facts", self._facts)
        if self.sender is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self.sender.run_forever(),
                                                                      name="edgeloop-telemetry"))

    def _tls(self) -> TlsFiles | None:
        s = self.settings
        if s.serving_engine == "triton" and (s.tls_cert_file or s.tls_key_file):
            raise ConfigError("TLS on the inference port is not available with serving_engine triton yet: use the "
                              "builtin engine for TLS, or terminate TLS in front of the pod")
        if s.tls_cert_file is None and s.tls_key_file is None:
            if s.tls_client_ca_file is not None:
                raise ConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file (mutual TLS is TLS first)")
            return None
        if s.tls_cert_file is None or s.tls_key_file is None:
            raise ConfigError("set both tls_cert_file and tls_key_file for TLS")
        return TlsFiles(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)

    def stats(self) -> dict[str, Any]:
        """Each model's status with its request latency percentiles since the last stats event, and the device's
        figures."""
        assert self.repository is not None
        models = []
        triton = self.repository.triton.metrics() if self.repository.triton is not None else {}
        for status in self.repository.index():
            recent = self.latencies_ms.pop(status["model_name"], None)
            values = np.array(recent) if recent else None
            models.append({
                **status,
                "requests": 0 if values is None else int(values.size),
                "p50_ms": None if values is None else round(float(np.percentile(values, 50)), 3),
                "p99_ms": None if values is None else round(float(np.percentile(values, 99)), 3),
                **({"triton": triton[status["model_name"]]} if status["model_name"] in triton else {}),
                **({"field": field} if self.field is not None
                   and (field := self.field.take(status["model_name"])) is not None else {}),
            })
        jetson = None
        if self.facts is not None and self.facts.is_jetson:
            sample = self.sensors.sample()
            self.metrics.observe_jetson(sample)
            jetson = sample.to_dict()
        return {
            "ready": self.repository.ready(),
            "models": models,
            "jetson": jetson if jetson is not None else {"unavailable": {"all": "not a Jetson"}},
            "telemetry_dropped": self.outbox.dropped() if self.outbox is not None else 0,
            "telemetry_errors": self.telemetry_errors,
            "capture": self.capture_stats(),
        }

    async def _stats_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.telemetry_interval_s)
            try:
                self.report("stats", self.stats())
            except Exception as exc:  # noqa: BLE001 - a stats failure must not end the stats
                log.error("could not compute stats: %s", exc)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, finish in-flight requests, flush telemetry once, release everything."""
        if self._server is not None:
            await self._server.stop(grace_s)
            shared = getattr(self._server, "edgeloop_shared_memory", None)
            if shared is not None:
                shared.unregister()  # every region apps registered
            for task in list(getattr(self._server, "edgeloop_background", ())):
                task.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self._stop_capture)
        if self.repository is not None:
            await self.repository.close()
        if self.sender is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sender.flush(), timeout=3)
            await self.sender.close()
        if self.outbox is not None:
            self.outbox.close()


async def serve(settings: EdgeSettings) -> None:
    """Run until SIGINT/SIGTERM."""
    from edgeloop_core.process import settle_heap

    app = EdgeApp(settings)
    await app.start()
    settle_heap()  # full collections then scan only what serving allocates, not every module loaded at start
    log.info("serving the Open Inference Protocol on %s:%d", settings.bind_address, app.grpc_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()


async def wait_until_ready(app: EdgeApp, timeout_s: float = 120.0) -> None:
    """Wait until the device is ready (its models serve their desired versions, by ``ready_policy``);
    :class:`NotReady` with each model's state and last error after ``timeout_s``."""
    from edgeloop_core.errors import NotReady

    deadline = asyncio.get_running_loop().time() + timeout_s
    while app.repository is None or not app.repository.ready():
        if asyncio.get_running_loop().time() > deadline:
            models = app.repository.index() if app.repository else []
            said = "; ".join(f"{m['model_name']}: {m['state']} {m.get('error', '')}".strip() for m in models)
            raise NotReady(f"the runtime did not become ready within {timeout_s:.0f}s: {said}")
        await asyncio.sleep(0.1)
