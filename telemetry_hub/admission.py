"""Admission: how many calls the hub takes in at once, sized from what it measures, not a constant.

The limit is an AIMD on the latency of the calls it admitted (Netflix concurrency-limits' ``AIMDLimit``): a call that
finishes within the target latency raises the limit by one (up to the ceiling); one that takes longer, or fails
because the database is unavailable, cuts it to :data:`BACKOFF` of itself (down to :data:`MIN_LIMIT`), at most once
per target latency (as TCP backs off once per round trip, not once per lost packet). While the hub keeps up, the
limit climbs to the ceiling within a second of traffic, so a burst it has the headroom for is taken in; once admitted
calls take longer than the target, the limit settles where they no longer do, which by Little's law is the hub's
measured capacity (calls/s) × the target latency. Calls past it are refused at once with ``RESOURCE_EXHAUSTED``
(devices back off) and counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

MIN_LIMIT = 4
"""The limit never falls below this (or the ceiling, when that is lower): a hub that is slow still takes calls."""
INITIAL_LIMIT = 64
"""Where the limit starts (or the ceiling, when that is lower), before the hub has measured anything."""
BACKOFF = 0.9
"""What a slow call multiplies the limit by (Netflix's AIMDLimit default)."""


class HubMetrics:
    """The hub's Prometheus metrics, in a registry of its own (tests run several hubs in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.refused = Counter("edgeloop_hub_admission_refused", "Report calls refused with RESOURCE_EXHAUSTED (past "
                               "the admission limit)", registry=self.registry)
        self.admitted = Counter("edgeloop_hub_admission_admitted", "Report calls admitted", registry=self.registry)
        self.limit = Gauge("edgeloop_hub_admission_limit", "Calls in progress the hub admits now (adaptive)",
                           registry=self.registry)
        self.in_flight = Gauge("edgeloop_hub_calls_in_flight", "Report calls in progress", registry=self.registry)

    def serve(self, address: str, port: int) -> None:
        """Start the HTTP exporter thread (``/metrics`` on ``port``)."""
        start_http_server(port, addr=address, registry=self.registry)


class AdmissionLimit:
    """The adaptive limit (see the module docstring). Used from the event loop's thread only: no lock."""

    def __init__(self, max_limit: int, target_latency_s: float, metrics: HubMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``max_limit``: the ceiling (calls in progress at once at most); ``target_latency_s``: the latency (s) an
        admitted call should finish within."""
        self.max_limit = max_limit
        self.min_limit = min(MIN_LIMIT, max_limit)
        self.target_latency_s = target_latency_s
        self.metrics = metrics or HubMetrics()
        self._clock = clock
        self._limit = float(min(INITIAL_LIMIT, max_limit))
        self._last_cut = -math.inf
        self.in_flight = 0
        self.refused = 0
        self.metrics.limit.set(self.limit)

    @property
    def limit(self) -> int:
        """Calls in progress admitted now."""
        return int(self._limit)

    def acquire(self) -> float | None:
        """Admit a call: its start time (s, for :meth:`release`), or ``None`` when the hub is at its limit (the
        call is to be refused, and is counted)."""
        if self.in_flight >= self.limit:
            self.refused += 1
            self.metrics.refused.inc()
            return None
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.admitted.inc()
        return self._clock()

    def release(self, started: float, *, overloaded: bool = False) -> None:
        """An admitted call ended (``overloaded``: it failed because the hub or its database could not keep up):
        adjust the limit from how long it took."""
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        now = self._clock()
        if overloaded or now - started > self.target_latency_s:
            if now - self._last_cut >= self.target_latency_s:
                self._limit = max(self.min_limit, self._limit * BACKOFF)
                self._last_cut = now
        else:
            self._limit = min(self.max_limit, self._limit + 1)
        self.metrics.limit.set(self.limit)
