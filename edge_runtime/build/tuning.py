"""Batch-size tuning on the device: after validation, measure latency and throughput for batch sizes up to the
engine's maximum and pick the dynamic-batching limits that keep a request within a latency budget.

Published Orin Nano measurements of a spectrogram transformer found larger batches cut time and energy per sample
until memory runs out; the best batch is a property of the device and the model, so each device measures its own.
Where the device has power rails (:mod:`edge_runtime.build.power`), each batch size also gets the module's energy
per inference (mJ), integrated over the same timed runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edge_runtime.build.engines.base import Engine
from edge_runtime.build.power import PowerSampler, time_with_energy
from edgeloop_core.errors import ConfigError
from edgeloop_core.timing import repeat_batch


@dataclass(frozen=True)
class BatchPoint:
    """One batch size, measured."""

    batch: int
    p50_ms: float
    p99_ms: float
    samples_per_s: float
    mj_per_inference: float | None = None
    """Module energy per inference (per sample) at this batch, mJ; ``None`` where there are no power rails."""


@dataclass(frozen=True)
class BatchingChoice:
    """The limits the batcher will use, and why."""

    max_batch_size: int
    max_queue_delay_us: int
    budget_ms: float
    expected_worst_ms: float
    """Queue delay plus the chosen batch's p99: what a request waits at worst."""
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch`` (which is always included)."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


def sweep(engine: Engine, sample: dict[str, np.ndarray], max_batch: int, *, runs: int = 30,
          warmup: int = 3, power: PowerSampler | None = None) -> list[BatchPoint]:
    """Time ``engine.infer`` on batches of copies of ``sample`` (one sample of every input, batch axis first), with
    the energy per inference where ``power`` has rails."""
    points = []
    for batch in batch_sizes(max_batch):
        x = repeat_batch(sample, batch)
        timing, mj = time_with_energy(lambda x=x: engine.infer(x), batch, power=power, runs=runs, warmup=warmup)
        points.append(BatchPoint(batch, timing.p50_ms, timing.p99_ms, batch / (timing.p50_ms / 1e3), mj))
    return points


def choose(points: list[BatchPoint], budget_ms: float, max_queue_delay_us: int) -> BatchingChoice:
    """The largest measured batch whose p99 fits the budget; the queue delay gets what the budget leaves, capped at
    ``max_queue_delay_us``. When even batch 1 misses the budget, batch 1 with no waiting (and the reason says so)."""
    if budget_ms <= 0 or not points:
        raise ConfigError("a batching latency budget must be positive and the sweep must have points")
    fitting = [p for p in points if p.p99_ms <= budget_ms]
    if not fitting:
        one = min(points, key=lambda p: p.batch)
        return BatchingChoice(1, 0, budget_ms, one.p99_ms,
                              f"batch 1 already takes {one.p99_ms:.2f} ms at p99, over the {budget_ms:.2f} ms budget")
    best = max(fitting, key=lambda p: p.batch)
    delay_us = int(min(max_queue_delay_us, max(0.0, budget_ms - best.p99_ms) * 1000))
    return BatchingChoice(best.batch, delay_us, budget_ms, best.p99_ms + delay_us / 1000,
                          f"batch {best.batch}: p99 {best.p99_ms:.2f} ms, {best.samples_per_s:.0f} samples/s")
