"""Who watches answered ModelInfer requests (field capture): the servicer tells :func:`notify_infer` about every
answered request; whatever the composition root attached to that set of served models sees it (field capture,
field statistics: each attaches its own). Nothing attached, nothing happens (one dictionary lookup). An observer
must return at once and never raise: it runs on the request path (field capture only queues, see
:mod:`edge_runtime.report.capture`)."""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from edge_runtime.serve.slot import ServingModel
    from edgeloop_core.protos import inference_pb2 as pb

log = logging.getLogger(__name__)


class InferObserver(Protocol):
    """Sees one answered request: the request as received, the model that answered, the input tensors exactly as
    the model received them and every output it returned (batch axis first)."""

    def __call__(self, request: pb.ModelInferRequest, model: ServingModel, inputs: dict[str, np.ndarray],
                 outputs: dict[str, np.ndarray]) -> None: ...


_observers: weakref.WeakKeyDictionary[object, tuple[InferObserver, ...]] = weakref.WeakKeyDictionary()
"""Served-model set (the servicer's ``runtime``) → its observers: several runtimes in one process (tests) stay
apart. Replaced whole, never edited, so the request path reads it without a lock."""


def attach(runtime: object, observer: InferObserver) -> None:
    """Let ``observer`` see every request answered from ``runtime`` (after those attached before)."""
    _observers[runtime] = (*_observers.get(runtime, ()), observer)


def detach(runtime: object, observer: InferObserver | None = None) -> None:
    """Stop ``observer`` (every observer, when ``None``) from seeing ``runtime``'s requests."""
    kept = tuple(o for o in _observers.get(runtime, ()) if observer is not None and o != observer)
    if kept:
        _observers[runtime] = kept
    else:
        _observers.pop(runtime, None)


def notify_infer(runtime: object, request: pb.ModelInferRequest, model: ServingModel,
                 inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """Tell ``runtime``'s observers, if any, about one answered request; an observer's failure is logged, never
    raised (the answer goes out regardless, and the other observers still see it)."""
    for observer in _observers.get(runtime, ()):
        try:
            observer(request, model, inputs, outputs)
        except Exception:  # observing must never fail a request
            log.exception("an infer observer failed")
