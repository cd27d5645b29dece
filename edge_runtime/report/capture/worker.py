"""Field capture of one device: ModelInfer requests are offered from the request path (:meth:`FieldCapture.offer`
only samples and queues, and drops and counts when the queue is full: serving never waits), and a worker thread
judges them by their model's policy and budgets, commits them to the spool and rolls the spool into shards that
the uploader sends home."""

from __future__ import annotations

import base64
import binascii
import logging
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.report.capture.budget import Budget
from edge_runtime.report.capture.records import CapturedItem, new_capture_id, tensor_record
from edge_runtime.report.capture.rules import HardExampleRules
from edge_runtime.report.capture.spool import Spool
from edge_runtime.serve.converters import SHM_REGION
from edgeloop_core.contract.captures import (
    CAPTURE_GROUP_MAX_CHARS,
    CAPTURE_GROUP_PARAMETER,
    CAPTURE_PAYLOAD_PARAMETER,
    CAPTURE_PAYLOAD_TYPE_PARAMETER,
    CapturePolicy,
    CaptureSettings,
    DriftBurst,
    HardExamples,
    capture_group,
)
from edgeloop_core.drift import divergence
from edgeloop_core.errors import ConfigError

if TYPE_CHECKING:
    from edge_runtime.report.capture.metrics import CaptureMetrics
    from edge_runtime.serve.slot import ServingModel
    from edgeloop_core.contract.field import FieldBaseline
    from edgeloop_core.contract.manifest import Task
    from edgeloop_core.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

DRIFT_QUEUE_ITEMS = 64
"""Field counts waiting for the worker's drift check; beyond, the newest are dropped (the next stats bring more)."""
COMMIT_ITEMS = 256
"""Most items committed in one file (one commit)."""
COMMIT_LINGER_S = 0.2
"""How long the worker lets offered requests gather after the first before it commits them, seconds (or until half
the queue is full, whichever comes first): one file, two fsyncs (file and folder) and later one removal for many
items rather than one each. A commit costs about 2 ms of CPU, most of it the fsyncs: at 1% of ~4,000 requests/s,
lone items committed one by one cost 5-8% of the server's CPU per request (the capture thread alone ~4%); gathered,
the capture thread takes about 1%, whatever the rate above a few items a second. An item is committed (on
disk, surviving a kill) at most this long after its answer plus the commit itself; serving never waits on it. A
label (:meth:`FieldCapture.label`), :meth:`FieldCapture.flush` and a stop commit what gathered at once."""
Configuration = Callable[[], tuple[CaptureSettings, dict[str, CapturePolicy]]]
"""Where the worker reads the device's capture settings and each model's policy (the desired state)."""


@dataclass(frozen=True)
class Offered:
    """One answered request waiting for the worker."""

    time_ns: int
    request: pb.ModelInferRequest
    model: str
    version: str
    variant: str
    target_key: str
    task: Task
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    sampled: bool
    fired_by: str = "sample"
    """The policy that sampled it: ``sample``, or ``drift_burst`` during a burst."""


@dataclass(frozen=True)
class Burst:
    """A model's drift burst: until when (monotonic and wall clock, s), at which rate, and the distance and feature
    that started or last extended it."""

    until: float
    until_wall: float
    sample_rate: float
    divergence: float
    feature: str


def free_bytes(path: Path) -> int:
    """Free space on the file system holding ``path``, bytes."""
    return shutil.disk_usage(path).free


class FieldCapture:
    """Capture for one device: spool under ``root``, items stamped with ``device_id``, policies from
    ``configuration`` (re-read every ``refresh_s`` seconds)."""

    def __init__(self, root: Path, device_id: str, configuration: Configuration, metrics: CaptureMetrics, *,
                 refresh_s: float = 1.0, disk_free: Callable[[Path], int] = free_bytes) -> None:
        self.root, self.device_id, self.configuration = Path(root), device_id, configuration
        self.metrics, self.refresh_s, self.disk_free = metrics, refresh_s, disk_free
        self.settings, self.policies = CaptureSettings(), dict[str, CapturePolicy]()
        self._active: dict[str, tuple[float, bool, float, float]] = {}
        """Model → (sample rate, has hard-example rules, burst sample rate, burst end on the monotonic clock): what
        :meth:`offer` reads, replaced whole, never edited."""
        self._bursts: dict[str, Burst] = {}
        """Model → its drift burst while one lasts (the worker's; :meth:`bursts` copies it)."""
        self._drift: queue.Queue[tuple[str, FieldBaseline, dict[str, list[int]]]] = queue.Queue(DRIFT_QUEUE_ITEMS)
        self.drift_checks = 0
        """Field counts compared with their baseline so far (tests, benchmarks)."""
        self._stopped: frozenset[str] = frozenset()
        """Models whose capture stopped at the disk floor (replaced whole)."""
        self._rules: dict[tuple[str, str, HardExamples], HardExampleRules | None] = {}
        self._budgets: dict[str, tuple[CapturePolicy, Budget]] = {}
        self._queue: queue.Queue[Offered | None] = queue.Queue(maxsize=1)
        """Made by :meth:`start` with the then ``queue_items`` (a change applies at the next start)."""
        self._gather = 1
        """Queued requests that end the worker's wait for company (half the queue, at most ``COMMIT_ITEMS``)."""
        self._gathered = threading.Event()
        """Set by :meth:`offer` when ``_gather`` requests are queued, and by :meth:`flush` and :meth:`stop`: the
        worker commits without waiting longer."""
        self._committed_ns = 0
        """Offer time (Unix ns) of the newest request the worker has judged and committed (or refused)."""
        self.ops = threading.Lock()
        """Serialises what changes the spool's items and labels (the worker's rolls, labels from the RPC)."""
        self.spool: Spool | None = None
        self._thread: threading.Thread | None = None
        self._next_refresh = 0.0
        self._spool_full_said = 0.0
        self._stop_seen = False
        self.on_ready: Callable[[], None] = lambda: None
        """Called when shards or label records are ready for upload (the uploader's wake-up)."""

    # --- the request path
    def offer(self, request: pb.ModelInferRequest, model: ServingModel, inputs: dict[str, np.ndarray],
              outputs: dict[str, np.ndarray], draw: float | None = None) -> None:
        """Consider one answered request (returns at once; never raises, never waits). ``draw``: the uniform [0, 1)
        number that samples it when it was drawn where the request was served (Triton's Python-backend model,
        :mod:`edge_runtime.report.capture.triton_tap`), else a fresh one."""
        active = self._active.get(model.name)
        if active is None:
            return
        rate, has_rules, burst_rate, burst_until = active
        draw, fired_by = random.random() if draw is None else draw, "sample"
        sampled = draw < rate
        if not sampled and draw < burst_rate and time.monotonic() < burst_until:
            sampled, fired_by = True, "drift_burst"
        if not (sampled or has_rules):
            return
        if model.name in self._stopped:
            self.metrics.dropped.labels(model.name, "disk_floor").inc()
            return
        if any(SHM_REGION in t.parameters for t in request.inputs):  # the app rewrites its region after the answer
            inputs = {name: np.array(value, copy=True) for name, value in inputs.items()}
        plan = model.plan
        try:
            self._queue.put_nowait(Offered(time.time_ns(), request, model.name, model.version, plan.variant.name,
                                           str(plan.target_key), model.manifest.task, inputs, outputs, sampled,
                                           fired_by))
        except queue.Full:
            self.metrics.dropped.labels(model.name, "queue_full").inc()
            return
        if self._queue.unfinished_tasks >= self._gather and not self._gathered.is_set():
            self._gathered.set()  # once per commit: the worker stops waiting for company

    # --- the worker
    def start(self) -> None:
        """Open the spool (finishing what a kill interrupted) and start the worker (blocking: call from a thread)."""
        self.refresh()
        self._queue = queue.Queue(maxsize=self.settings.queue_items)
        self._gather = max(1, min(COMMIT_ITEMS, self.settings.queue_items // 2))
        self.spool = Spool(self.root, self.settings.spool_max_bytes)
        self.metrics.spool_bytes.set(self.spool.bytes)
        self._thread = threading.Thread(target=self._run, name="edgeloop-capture", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        """Re-read the settings and policies, and check the disk floor; log once per change."""
        try:
            settings, policies = self.configuration()
        except Exception as exc:  # noqa: BLE001 - keep the last good configuration
            log.warning("capture keeps its last configuration: %s", exc)
            settings, policies = self.settings, self.policies
        if not settings.enabled:
            policies = {}
        self.settings, self.policies = settings, policies
        self._budgets = {name: self._budgets[name] if name in self._budgets and self._budgets[name][0] == policy
                         else (policy, Budget(policy.items_per_hour, policy.bytes_per_day))
                         for name, policy in policies.items()}
        for model in [m for m in self._bursts if policies.get(m) is None or policies[m].drift_burst is None]:
            del self._bursts[model]  # its policy no longer bursts: the burst ends now
            self.metrics.burst_active.labels(model).set(0)
        self._publish_active()
        if self.spool is not None:
            self.spool.max_bytes = settings.spool_max_bytes
        self._check_disk()

    def _check_disk(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = self.disk_free(self.root)
        stopped = frozenset(n for n, p in self.policies.items() if free < p.disk_free_floor_bytes)
        for name in stopped - self._stopped:
            log.warning("capture of %s stops: %d bytes free under %s, below its floor of %d (serving goes on)",
                        name, free, self.root, self.policies[name].disk_free_floor_bytes)
        for name in self._stopped - stopped:
            log.warning("capture of %s resumes: %d bytes free under %s", name, free, self.root)
        for name in stopped ^ self._stopped:
            self.metrics.stopped.labels(name, "disk_floor").set(1 if name in stopped else 0)
        self._stopped = stopped

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                if batch:
                    self._take(batch)
                if time.monotonic() >= self._next_refresh or not batch:
                    self._tick()
            except Exception:  # a background loop reports and goes on
                log.exception("capture worker error")
                for offered in batch:
                    self.metrics.dropped.labels(offered.model, "error").inc()
            if batch:
                self._committed_ns = batch[-1].time_ns
            for _ in batch:
                self._queue.task_done()
            if self._thread is None and (not batch or self._stop_seen):
                return

    def _next_batch(self) -> list[Offered]:
        """What queued since the last commit (up to ``COMMIT_ITEMS``): after the first, others gather for up to
        :data:`COMMIT_LINGER_S` (less when enough queue, or a flush or stop asks); empty on a stop."""
        batch: list[Offered] = []
        try:
            first = self._queue.get(timeout=min(self.refresh_s, 0.5))
            self._gathered.clear()
            if first is not None and self._thread is not None and self._queue.qsize() < self._gather - 1:
                self._gathered.wait(COMMIT_LINGER_S)  # one wake-up: offer() sets it when enough queued
            while first is not None:
                batch.append(first)
                if len(batch) >= COMMIT_ITEMS:
                    break
                first = self._queue.get_nowait()
            if first is None:
                self._queue.task_done()  # the stop marker
                self._stop_seen = True
        except queue.Empty:
            pass
        return batch

    def _tick(self) -> None:
        if time.monotonic() >= self._next_refresh:
            self.refresh()
            self._next_refresh = time.monotonic() + self.refresh_s
        self._check_drift()
        self.roll_due()

    # --- drift bursts
    def field_counts(self, model: str, baseline: FieldBaseline, counts: dict[str, list[int]]) -> None:
        """Field statistics' counts of ``model`` as they go to the stats event (a
        :attr:`~edge_runtime.report.field.FieldStatistics.listeners` entry): queued for the worker, which compares
        them with ``baseline`` (returns at once; never raises, never waits)."""
        try:
            self._drift.put_nowait((model, baseline, counts))
        except queue.Full:
            pass  # the worker is behind; the next stats event brings fresh counts

    def _check_drift(self) -> None:
        """Start (or extend) a model's burst when its counts drift past its policy's threshold; end bursts whose time
        ran out. Runs on the worker thread: the divergence never costs a request anything."""
        changed = False
        while True:
            try:
                model, baseline, counts = self._drift.get_nowait()
            except queue.Empty:
                break
            policy = self.policies.get(model)
            if policy is not None and policy.drift_burst is not None:
                changed |= self._maybe_burst(model, policy.drift_burst, divergence(baseline, counts))
            self.drift_checks += 1
        now = time.monotonic()
        for model in [m for m, burst in self._bursts.items() if burst.until <= now]:
            del self._bursts[model]
            self.metrics.burst_active.labels(model).set(0)
            changed = True
        if changed:
            self._publish_active()

    def _maybe_burst(self, model: str, rule: DriftBurst, distances: dict[str, float]) -> bool:
        """Start or extend ``model``'s burst when its largest distance passes ``rule.threshold`` (logged once per
        burst: figures only, never data); whether anything changed."""
        if not distances:
            return False
        feature = max(distances, key=distances.__getitem__)
        if not distances[feature] > rule.threshold:
            return False
        until = time.monotonic() + rule.minutes * 60
        started = model not in self._bursts
        self._bursts[model] = Burst(until, time.time() + rule.minutes * 60, rule.sample_rate, distances[feature],
                                    feature)
        if started:
            self.metrics.bursts.labels(model).inc()
            self.metrics.burst_active.labels(model).set(1)
            log.warning("capture of %s bursts for %g min at %g%% of requests: field drift %.3f on %s is above %g",
                        model, rule.minutes, rule.sample_rate * 100, distances[feature], feature, rule.threshold)
        return True

    def _publish_active(self) -> None:
        """Replace what :meth:`offer` reads: each policy's rates, with its model's burst where one lasts."""
        bursts = self._bursts
        self._active = {name: (p.sample_rate, p.hard_examples is not None,
                               bursts[name].sample_rate if name in bursts else 0.0,
                               bursts[name].until if name in bursts else 0.0) for name, p in self.policies.items()}

    def bursts(self) -> dict[str, dict[str, Any]]:
        """The drift bursts lasting now, for the stats event: model → ``{"until"`` (UTC, ISO 8601), ``"sample_rate"``,
        ``"divergence"``, ``"feature"}`` (the largest distance that started or last extended it)."""
        now = time.monotonic()
        return {model: {"until": datetime.fromtimestamp(b.until_wall, timezone.utc).isoformat(timespec="seconds"),
                        "sample_rate": b.sample_rate, "divergence": round(b.divergence, 4), "feature": b.feature}
                for model, b in dict(self._bursts).items() if b.until > now}

    def roll_due(self, force: bool = False) -> int:
        """Roll every model whose spooled items make a shard (all of them with ``force``); returns items rolled."""
        assert self.spool is not None
        rolled = 0
        with self.ops:
            for model in list(self.spool.items):
                while self.spool.items.get(model) and (force or self.spool.due(
                        model, time.time_ns(), self.settings.shard_max_items, self.settings.shard_max_age_s)):
                    rolled += self.spool.roll(model, self.settings.shard_max_items)
        self.metrics.spool_bytes.set(self.spool.bytes)
        if rolled:
            self.on_ready()
        return rolled

    def _take(self, batch: list[Offered]) -> None:
        """Judge offered requests and commit those their policy and budgets take: one file per model and UTC day
        (one fsync for all of them)."""
        assert self.spool is not None
        taken: dict[tuple[str, object], list[CapturedItem]] = {}
        for offered in batch:
            item = self._judge(offered)
            if item is not None:
                taken.setdefault((item.model, item.time.date()), []).append(item)
        for items in taken.values():
            with self.ops:
                dropped = self.spool.add(*items)
            counted: dict[tuple[str, str], int] = {}
            for item in items:
                counted[(item.model, item.policy)] = counted.get((item.model, item.policy), 0) + 1
            for (model, policy), n in counted.items():
                self.metrics.captured.labels(model, policy).inc(n)
            if dropped:
                self._say_spool_full(dropped)
        self.metrics.spool_bytes.set(self.spool.bytes)

    def _judge(self, offered: Offered) -> CapturedItem | None:
        """The item to commit for one offered request, when its policy and budgets take it (budget spent)."""
        entry = self._budgets.get(offered.model)
        if entry is None:
            return None  # its policy went away meanwhile
        policy, budget = entry
        fired: tuple[str, float | None] | None = (offered.fired_by, None)
        if not offered.sampled:
            rules = self._rules_for(offered, policy)
            fired = rules.judge(offered.inputs, offered.outputs) if rules is not None else None
        if fired is None:
            return None
        item = self._item(offered, policy, *fired)
        now_s, size = offered.time_ns / 1e9, item.size_bytes()
        refusal = budget.refusal(now_s, size)
        if refusal is not None:
            self.metrics.dropped.labels(offered.model, refusal).inc()
            return None
        budget.spend(now_s, size)
        return item

    def _say_spool_full(self, dropped: list[tuple[str, str]]) -> None:
        for model, _ in dropped:
            self.metrics.dropped.labels(model, "spool_full").inc()
        if time.monotonic() - self._spool_full_said > 60:
            self._spool_full_said = time.monotonic()
            log.warning("capture spool full (%d bytes cap under %s): dropped the %d oldest items; uploads cannot keep "
                        "up, or S3 is unreachable", self.settings.spool_max_bytes, self.root, len(dropped))

    def _rules_for(self, offered: Offered, policy: CapturePolicy) -> HardExampleRules | None:
        """The policy's rules for the model's task, made once per model version and rules."""
        if policy.hard_examples is None:
            return None
        key = (offered.model, offered.version, policy.hard_examples)
        if key not in self._rules:
            try:
                self._rules[key] = HardExampleRules(policy.hard_examples, offered.task)
            except ConfigError as exc:  # said once per model version and rules, not per request
                log.error("hard-example rules of %s %s are off: %s", offered.model, offered.version, exc)
                self._rules[key] = None
        return self._rules[key]

    def _item(self, offered: Offered, policy: CapturePolicy, rule: str, score: float | None) -> CapturedItem:
        payload, payload_type = payload_of(offered.request) if policy.keep_payload else (None, None)
        return CapturedItem(
            capture_id=new_capture_id(offered.time_ns),
            time=datetime.fromtimestamp(offered.time_ns / 1e9, timezone.utc), device_id=self.device_id,
            model=offered.model, version=offered.version, variant=offered.variant, target_key=offered.target_key,
            request_id=offered.request.id, policy=rule, score=score,
            inputs=[tensor_record(n, a) for n, a in offered.inputs.items()],
            outputs=[tensor_record(n, np.asarray(a)) for n, a in offered.outputs.items()],
            payload=payload, payload_type=payload_type, group=group_of(offered.request))

    # --- labels
    def label(self, model: str, request_id: str, value: Any, source: str) -> tuple[str, int]:  # noqa: ANN401
        """Keep a label for ``request_id`` of ``model``: ``("joined", n)`` when n spooled captures will carry it,
        ``("record", 0)`` when it goes home on its own (blocking: call from a thread)."""
        assert self.spool is not None
        self.flush()  # a label sent right after its answer joins the capture still gathering
        record = {"label_id": new_capture_id(), "model": model, "request_id": request_id, "label": value,
                  "source": source, "time": datetime.now(timezone.utc).isoformat(), "device_id": self.device_id}
        with self.ops:
            joined = self.spool.add_label(record)
        outcome = "joined" if joined else "record"
        if not joined:
            self.on_ready()
        self.metrics.labels.labels(outcome).inc()
        self.metrics.spool_bytes.set(self.spool.bytes)
        return outcome, joined

    def stop(self, timeout_s: float = 5.0) -> None:
        """Commit what is queued, then stop the worker (spooled items stay for the next start)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:
                log.warning("capture worker did not take the stop in %.0fs", timeout_s)
            self._gathered.set()  # no lingering: commit what gathered now
            thread.join(timeout_s)

    def flush(self, timeout_s: float = 2.0) -> None:
        """Commit every request offered before now without waiting for :data:`COMMIT_LINGER_S` (blocking, at most
        ``timeout_s``: call from a thread)."""
        since, deadline = time.time_ns(), time.monotonic() + timeout_s
        while self._thread is not None and self._queue.unfinished_tasks and self._committed_ns < since \
                and time.monotonic() < deadline:
            self._gathered.set()  # again each turn: the worker clears it when it takes a new first item
            time.sleep(0.002)

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every offered request was judged (tests, benchmarks), committing without lingering."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            self._gathered.set()
            time.sleep(0.01)


def payload_of(request: pb.ModelInferRequest) -> tuple[bytes | None, str | None]:
    """The raw payload an app attached (:data:`CAPTURE_PAYLOAD_PARAMETER`, base64) and its media type; ``(None,
    None)`` without one, or when it is not valid base64 (logged)."""
    if CAPTURE_PAYLOAD_PARAMETER not in request.parameters:
        return None, None
    try:
        payload = base64.b64decode(request.parameters[CAPTURE_PAYLOAD_PARAMETER].string_param, validate=True)
    except (binascii.Error, ValueError):
        log.warning("request %r: %s is not base64; captured without it", request.id, CAPTURE_PAYLOAD_PARAMETER)
        return None, None
    media = request.parameters[CAPTURE_PAYLOAD_TYPE_PARAMETER].string_param \
        if CAPTURE_PAYLOAD_TYPE_PARAMETER in request.parameters else None
    return payload, media or None


def group_of(request: pb.ModelInferRequest) -> str:
    """The capture group the app named (:data:`CAPTURE_GROUP_PARAMETER`, a ``string_param``), ``""`` without one or
    when it is not a valid group (logged without its value: nothing captured goes to the logs)."""
    if CAPTURE_GROUP_PARAMETER not in request.parameters:
        return ""
    parameter = request.parameters[CAPTURE_GROUP_PARAMETER]
    group = capture_group(parameter.string_param) if parameter.WhichOneof("parameter_choice") == "string_param" \
        else None
    if group is None:
        log.warning("request %r: %s is not a string of at most %d printable characters; captured without a group",
                    request.id, CAPTURE_GROUP_PARAMETER, CAPTURE_GROUP_MAX_CHARS)
        return ""
    return group
