"""Field statistics for drift (:mod:`edgeloop_core.drift`): what each model serves, counted into the bins of its
manifest's ``field_baseline``, off the request path, and handed to the stats event for the hub to compare.

The request path only samples (``rate`` of answered requests) and queues references to the request's arrays; a
full queue drops and counts, never waits. A worker thread computes the features. A model's counts go into a stats
event once they hold ``min_samples`` samples (fewer say too little about a distribution), then start anew; a new
version of a model starts anew too (its baseline may differ). Nothing of the inputs themselves leaves the device:
only counts per bin.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from typing import TYPE_CHECKING, Any

from edgeloop_core.drift import FieldCounts

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from edge_runtime.serve.slot import ServingModel
    from edgeloop_core.contract import Task
    from edgeloop_core.contract.field import FieldBaseline
    from edgeloop_core.protos import inference_pb2 as pb

log = logging.getLogger(__name__)

_Offered = tuple[str, str, "FieldBaseline", "Task", "dict[str, np.ndarray]", "dict[str, np.ndarray]"]


class FieldStatistics:
    """Per model: counts of what it serves in its baseline's bins (models without a baseline are not counted).

    Args:
        rate: share of answered requests counted (0: off), at random.
        min_samples: samples a model's counts need before :meth:`take` hands them over.
        queue_items: requests waiting for the worker, at most; more are dropped (:attr:`dropped`).
    """

    def __init__(self, rate: float, min_samples: int, queue_items: int = 256) -> None:
        self.rate, self.min_samples = rate, min_samples
        self.dropped = 0
        """Requests sampled but not counted because the worker was behind."""
        self._queue: queue.Queue[_Offered | None] = queue.Queue(maxsize=queue_items)
        self._counts: dict[str, tuple[str, FieldCounts]] = {}  # model -> (version, counts)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.listeners: list[Callable[[str, FieldBaseline, dict[str, list[int]]], None]] = []
        """Called by :meth:`take` with (model, its baseline, the counts taken) for each model's counts it hands over
        (field capture's drift burst); each must return at once: it runs where the stats are made."""

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None and self.rate > 0:
            self._thread = threading.Thread(target=self._run, name="edgeloop-field-stats", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker (what is queued is counted first)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def observe(self, request: pb.ModelInferRequest, model: ServingModel, inputs: dict[str, np.ndarray],
                outputs: dict[str, np.ndarray]) -> None:
        """On the request path: maybe queue one answered request (returns at once, never raises)."""
        baseline = model.manifest.field_baseline
        if baseline is None or self._thread is None or random.random() >= self.rate:
            return
        try:
            self._queue.put_nowait((model.name, model.version, baseline, model.manifest.task, inputs, outputs))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            name, version, baseline, task, inputs, outputs = item
            try:
                with self._lock:
                    held = self._counts.get(name)
                    if held is None or held[0] != version:
                        held = self._counts[name] = (version, FieldCounts(baseline))
                    held[1].add(inputs, outputs, task)
            except Exception as exc:  # noqa: BLE001 - statistics must never stop; the next request is counted
                log.warning("field statistics of %s could not count a request: %s", name, exc)

    def take(self, model_name: str) -> dict[str, Any] | None:
        """For the stats event: ``{"samples", "version", "counts", "baseline", "moments"}`` of ``model_name`` once
        it has :attr:`min_samples` samples (then its counts start anew); ``None`` before."""
        with self._lock:
            held = self._counts.get(model_name)
            if held is None or held[1].samples < self.min_samples:
                return None
            version, counts = held
            samples, moments = counts.samples, counts.moments()
            taken = counts.take()
        self._tell(model_name, counts.baseline, taken)
        return {"samples": samples, "version": version, "counts": taken,
                "baseline": {name: f.proportions for name, f in counts.baseline.features.items()},
                "moments": {name: {"mean": round(m, 6), "std": round(s, 6)} for name, (m, s) in moments.items()}}

    def _tell(self, model_name: str, baseline: FieldBaseline, counts: dict[str, list[int]]) -> None:
        for listener in self.listeners:
            try:
                listener(model_name, baseline, counts)
            except Exception as exc:  # noqa: BLE001 - a listener's fault must not cost the stats event its figures
                log.warning("field statistics listener failed for %s: %s", model_name, exc)
