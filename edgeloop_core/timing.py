"""One way to time an engine (or any call) on this device: validation's latency check, batch-size tuning, the
on-device variant choice and the pipeline's evaluation all measure through :func:`time_calls`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Wall-clock milliseconds of repeated calls."""

    p50_ms: float
    p99_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return asdict(self)


def time_calls(call: Callable[[], Any], *, runs: int = 50, warmup: int = 3, budget_s: float | None = None,
               min_runs: int = 3) -> Timing:
    """Call ``call`` ``warmup`` times untimed, then up to ``runs`` times timed.

    With ``budget_s``, timing stops once that many seconds went by (after at least ``min_runs`` timed calls), so
    a slow engine costs a bounded time to measure: the figures then rest on fewer runs (``Timing.runs`` says how
    many).
    """
    for _ in range(warmup):
        call()
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    times: list[float] = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        call()
        end = time.perf_counter()
        times.append(end - start)
        if deadline is not None and end >= deadline and len(times) >= min_runs:
            break
    values = np.asarray(times) * 1e3
    return Timing(float(np.percentile(values, 50)), float(np.percentile(values, 99)), len(times))


def repeat_batch(sample: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """A batch of ``batch`` copies of one sample (every input's batch axis first)."""
    return {name: np.repeat(value[:1], batch, axis=0) for name, value in sample.items()}
