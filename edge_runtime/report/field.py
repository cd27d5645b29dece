"""Field statistics for drift (:mod:`edgeloop_core.drift`) and feedback accuracy: what each model serves, counted
into the bins of its manifest's ``field_baseline``, off the request path, and handed to the stats event for the hub
to compare; and, for classifiers, whether the labels apps send later (the Label RPC) agree with what was served.

The request path only samples (``rate`` of answered requests) and queues references to the request's arrays; a
full queue drops and counts, never waits. A worker thread computes the features. A model's counts go into a stats
event once they hold ``min_samples`` samples (fewer say too little about a distribution), then start anew; a new
version of a model starts anew too (its baseline may differ). Nothing of the inputs themselves leaves the device:
only counts per bin.

Feedback accuracy: every answered request of a classifier that carries an OIP request id is queued too (whatever
``rate`` says), and the worker remembers its top-1 class per sample in a bounded map (``remembered`` request ids per
model, the oldest forgotten first). A label that arrives for a remembered id is compared with it; the counts per
model and version (``labels``: received for a request the device still remembered, so of a known version;
``known``: of those, the ones naming a class it can compare; ``correct``) go into the stats event as
``field.feedback`` and into Prometheus (``edgeloop_feedback_labels_total{model, outcome}``, where a label for a
forgotten request, or one naming no class, is ``unknown``). Neither labels nor classes are ever logged.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from edgeloop_core.drift import CLASSIFIER_KINDS, FieldCounts
from edgeloop_core.quality import classifier_output

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    from prometheus_client import CollectorRegistry

    from edge_runtime.serve.slot import ServingModel
    from edgeloop_core.contract import Task
    from edgeloop_core.contract.field import FieldBaseline
    from edgeloop_core.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

_Offered = tuple[str, str, "FieldBaseline | None", "Task", "dict[str, np.ndarray]", "dict[str, np.ndarray]", str,
                 "list[str]"]
"""(model, version, baseline when the request is counted for drift, task, inputs, outputs, request id to remember
(empty: none), the model's class labels)."""
_Label = tuple[str, str, Any]
"""(model, request id, label value): a label for the worker to compare, after every request queued before it."""
_Served = tuple[str, tuple[int, ...], list[str]]
"""What the device served for one request id: (version, top-1 class per sample, the model's class labels)."""
OUTCOMES = ("correct", "wrong", "unknown")


def label_classes(value: Any, labels: list[str], samples: int) -> list[int] | None:  # noqa: ANN401 - a JSON value
    """The class index per sample a label names: an index, a class name of ``labels``, or a list of either with
    one entry per sample of the request; ``None`` when it names none comparably (a box list, a flag, ...)."""
    values = value if isinstance(value, list) else [value]
    if len(values) != samples:
        return None
    classes: list[int] = []
    for one in values:
        if isinstance(one, int) and not isinstance(one, bool):
            classes.append(one)
        elif isinstance(one, str) and one in labels:
            classes.append(labels.index(one))
        else:
            return None
    return classes


class FeedbackMetrics:
    """``edgeloop_feedback_labels_total{model, outcome}``: labels apps sent, by whether the class served for their
    request was right (``correct``, ``wrong``) or the device no longer knew it (``unknown``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self.labels = Counter("edgeloop_feedback_labels", "labels apps sent for served requests (the Label RPC), by "
                              "outcome: correct / wrong top-1, or unknown (request forgotten, or not a class)",
                              ["model", "outcome"], registry=registry)


class FieldStatistics:
    """Per model: counts of what it serves in its baseline's bins (models without a baseline are not counted), and
    the feedback accuracy of classifiers.

    Args:
        rate: share of answered requests counted for drift (0: off), at random.
        min_samples: samples a model's counts need before :meth:`take` hands them over.
        queue_items: requests (and labels) waiting for the worker, at most; more are dropped (:attr:`dropped`).
        remembered: request ids remembered per model for feedback (their top-1), the oldest forgotten first.
        registry: Prometheus registry for :class:`FeedbackMetrics` (``None``: no metrics).
    """

    def __init__(self, rate: float, min_samples: int, queue_items: int = 256, remembered: int = 8192,
                 registry: CollectorRegistry | None = None) -> None:
        self.rate, self.min_samples, self.remembered = rate, min_samples, remembered
        self.dropped = 0
        """Requests sampled (or labels sent) but not counted because the worker was behind."""
        self._queue: queue.Queue[_Offered | _Label | None] = queue.Queue(maxsize=queue_items)
        self._counts: dict[str, tuple[str, FieldCounts]] = {}  # model -> (version, counts)
        self._served: dict[str, OrderedDict[str, _Served]] = {}  # model -> request id -> what was served
        self._feedback: dict[str, dict[str, list[int]]] = {}  # model -> version -> [labels, known, correct]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.metrics = FeedbackMetrics(registry) if registry is not None else None
        self.listeners: list[Callable[[str, FieldBaseline, dict[str, list[int]]], None]] = []
        """Called by :meth:`take` with (model, its baseline, the counts taken) for each model's counts it hands over
        (field capture's drift burst); each must return at once: it runs where the stats are made."""

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgeloop-field-stats", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker (what is queued is counted first)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def observe(self, request: pb.ModelInferRequest, model: ServingModel, inputs: dict[str, np.ndarray],
                outputs: dict[str, np.ndarray], draw: float | None = None) -> None:
        """On the request path: maybe queue one answered request (returns at once, never raises). ``draw``: the
        uniform [0, 1) number that samples it when it was drawn where the request was served (Triton's
        Python-backend model, :mod:`edge_runtime.report.capture.triton_tap`), else a fresh one."""
        if self._thread is None:
            return
        manifest = model.manifest
        draw = random.random() if draw is None else draw
        baseline = manifest.field_baseline if self.rate > 0 and draw < self.rate else None
        remember = request.id if request.id and manifest.task.kind in CLASSIFIER_KINDS else ""
        if baseline is None and not remember:
            return
        try:
            self._queue.put_nowait((model.name, model.version, baseline, manifest.task, inputs, outputs, remember,
                                    manifest.labels))
        except queue.Full:
            self.dropped += 1

    def feedback(self, model_name: str, request_id: str, value: Any) -> None:  # noqa: ANN401 - a JSON value
        """A label an app sent for ``request_id`` (the Label RPC): queued behind every request answered before it,
        compared by the worker with what was served (returns at once, never raises; a full queue counts it as
        ``unknown``)."""
        try:
            self._queue.put_nowait((model_name, request_id, value))
        except queue.Full:
            self.dropped += 1
            self._count_label(model_name, None, None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if len(item) == 3:
                    self._compare(*item)  # type: ignore[misc]
                else:
                    self._add(item)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - statistics must never stop; the next request is counted
                log.warning("field statistics of %s could not count a request: %s", item[0], exc)

    def _add(self, item: _Offered) -> None:
        name, version, baseline, task, inputs, outputs, request_id, labels = item
        if baseline is not None:
            with self._lock:
                held = self._counts.get(name)
                if held is None or held[0] != version:
                    held = self._counts[name] = (version, FieldCounts(baseline))
                held[1].add(inputs, outputs, task)
        if request_id:
            top1 = tuple(int(c) for c in classifier_output(outputs, task).argmax(axis=1))
            with self._lock:
                served = self._served.setdefault(name, OrderedDict())
                served[request_id] = (version, top1, labels)
                served.move_to_end(request_id)
                while len(served) > self.remembered:
                    served.popitem(last=False)

    def _compare(self, model_name: str, request_id: str, value: Any) -> None:  # noqa: ANN401 - a JSON value
        with self._lock:
            served = self._served.get(model_name, {}).get(request_id)
        if served is None:
            self._count_label(model_name, None, None)
            return
        version, top1, labels = served
        classes = label_classes(value, labels, len(top1))
        self._count_label(model_name, version, None if classes is None else
                          sum(int(a == b) for a, b in zip(classes, top1, strict=True)), len(top1))

    def _count_label(self, model_name: str, version: str | None, correct: int | None, samples: int = 1) -> None:
        """Count ``samples`` labels of ``model_name``: for ``version`` when known (``correct`` of them right; ``None``:
        not comparable), else for no version (only the metric counts them)."""
        if version is not None:
            with self._lock:
                counts = self._feedback.setdefault(model_name, {}).setdefault(version, [0, 0, 0])
                counts[0] += samples
                if correct is not None:
                    counts[1] += samples
                    counts[2] += correct
        if self.metrics is not None:
            if correct is None:
                self.metrics.labels.labels(model_name, "unknown").inc(samples)
            else:
                self.metrics.labels.labels(model_name, "correct").inc(correct)
                self.metrics.labels.labels(model_name, "wrong").inc(samples - correct)

    def take_feedback(self, model_name: str) -> dict[str, dict[str, int]]:
        """Feedback counts of ``model_name`` since the last call, per version: ``{"labels", "known", "correct"}``
        (then they start anew); empty when no label arrived."""
        with self._lock:
            taken = self._feedback.pop(model_name, {})
        return {version: {"labels": c[0], "known": c[1], "correct": c[2]} for version, c in taken.items()}

    def take(self, model_name: str) -> dict[str, Any] | None:
        """For the stats event: ``{"samples", "version", "counts", "baseline", "moments"}`` of ``model_name`` once
        it has :attr:`min_samples` samples (then its counts start anew), with ``"feedback"`` (see
        :meth:`take_feedback`) when labels arrived; only ``{"feedback"}`` before; ``None`` when neither."""
        feedback = self.take_feedback(model_name)
        with self._lock:
            held = self._counts.get(model_name)
            if held is None or held[1].samples < self.min_samples:
                return {"feedback": feedback} if feedback else None
            version, counts = held
            samples, moments = counts.samples, counts.moments()
            taken = counts.take()
        self._tell(model_name, counts.baseline, taken)
        return {"samples": samples, "version": version, "counts": taken,
                "baseline": {name: f.proportions for name, f in counts.baseline.features.items()},
                "moments": {name: {"mean": round(m, 6), "std": round(s, 6)} for name, (m, s) in moments.items()},
                **({"feedback": feedback} if feedback else {})}

    def _tell(self, model_name: str, baseline: FieldBaseline, counts: dict[str, list[int]]) -> None:
        for listener in self.listeners:
            try:
                listener(model_name, baseline, counts)
            except Exception as exc:  # noqa: BLE001 - a listener's fault must not cost the stats event its figures
                log.warning("field statistics listener failed for %s: %s", model_name, exc)
