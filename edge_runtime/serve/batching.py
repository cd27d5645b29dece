"""Dynamic batching that takes what is waiting and never waits for nothing.

When the engine is free, every queued request that fits (same non-batch shapes, at most ``max_batch_size`` samples
in all) runs now, in one engine call; a request that arrives while the engine is busy waits for the next call,
and the queue fills meanwhile — that, not a timer, is what forms batches under load. ``max_queue_delay_us`` (Triton's
``max_queue_delay_microseconds``) is an optional extra wait for company when the engine is free and the batch is not
full; it is 0 by default, so a lone request runs at once. Where the server, not the engine, is the bottleneck (a
small model behind Python gRPC, which hands requests over one at a time) the engine is never busy long enough for a
queue to form, so ``company_delay_us`` waits for company only while waiting brings it (see
:meth:`DynamicBatcher._company_wait`): a lone client is not kept waiting, 32 clients get full batches. A request
larger than the engine's batch is split into several runs and reassembled (the largest request is the server's
business, the largest engine batch the engine's). Errors are isolated: a failing merged run is retried
request by request, so one bad request fails alone.

The engine runs on one dedicated thread per batcher (ONNX Runtime and TensorRT release the GIL while they compute),
so the event loop stays free and no thread pool is shared with anything else — except when runs are so short
(under :data:`INLINE_RUN_S`, measured as a moving average) that handing them to a thread costs more than the run
itself (14% of the server's CPU for the digits CNN, by py-spy): those run inline on the event loop.

What the batcher did is counted (:class:`BatchingCounts`, ``DynamicBatcher.counts``): requests, batches formed,
engine runs, waits for company and probes taken, and what those waits gathered. Tests check behaviour on these
counts, not on wall-clock time; how fast it is lives in ``bench/``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_runtime.aio import wait_event
from edge_runtime.build.engines.base import Engine
from edgeloop_core.errors import NotReady

_Item = tuple[dict[str, np.ndarray], "asyncio.Future[dict[str, np.ndarray]]"]
INLINE_RUN_S = 200e-6
"""Engine runs shorter than this (moving average) run inline: the thread hand-off would cost more."""
PROBE_EVERY = 64
"""With ``company_delay_us``: after this many runs without waiting, one run waits to see whether company comes."""
PROBE_S = 1e-3
"""The longest probe (asyncio's timers are good to about a millisecond)."""
EMPTY_WAITS = 2
"""With ``company_delay_us``: waiting stops after this many waits in a row brought nobody (one could be the end of a
burst, after which the next burst should not start unbatched)."""
EXPLORE_EVERY = 8
"""With ``company_delay_us``: one wait in this many stays open until the batch is full or the deadline."""


@dataclass
class BatchingCounts:
    """What one :class:`DynamicBatcher` has done since it started (plain counters, read from the event loop)."""

    requests: int = 0
    """Requests queued by :meth:`DynamicBatcher.infer`."""
    batches: int = 0
    """Batches formed: each takes every queued request that can share a run (a request alone is a batch of one)."""
    runs: int = 0
    """Engine calls: one per batch, more where a request larger than the engine's batch is split or a failed merged
    run is retried request by request."""
    waits: int = 0
    """Waits for company taken before a batch: ``max_queue_delay_us`` ones, and ``company_delay_us`` ones once a
    probe found company (probes are not counted here)."""
    probes: int = 0
    """``company_delay_us`` probes taken: short waits (at most :data:`PROBE_S`) to see whether company comes."""
    gathered: int = 0
    """Samples that arrived during waits and probes (what waiting brought)."""


def _rows(item: _Item) -> int:
    return next(iter(item[0].values())).shape[0]


def _shapes(item: _Item) -> tuple[tuple[int, ...], ...]:
    """Non-batch shapes: only requests that agree on them can share a run (dynamic axes)."""
    return tuple(value.shape[1:] for value in item[0].values())


class DynamicBatcher:
    """One worker task and one engine thread per engine. :meth:`close` finishes every queued request first."""

    def __init__(self, engine: Engine, *, max_batch_size: int, max_queue_delay_us: int = 0, company_delay_us: int = 0,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.engine = engine
        self.max_batch_size = max(1, min(max_batch_size, getattr(engine, "max_batch_size", max_batch_size)))
        """The largest engine run; requests may be larger (they are split)."""
        self.delay_s = max_queue_delay_us / 1e6
        self.company_delay_s = company_delay_us / 1e6
        """The wait for company while waiting brings it (see :meth:`_company_wait`)."""
        self._waiting = False  # waiting for company brings it (see _company_wait)
        self._unwaited = self._waits = self._empty = 0
        self._expect = self.max_batch_size  # samples the last open-ended wait gathered
        self._on_batch = on_batch
        self._pending: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeloop-engine")
        self._run_s = 1.0  # moving average of one engine run; starts high so the first runs use the thread
        self.counts = BatchingCounts()
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="edgeloop-batcher")

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (batch axis first) and wait for its rows of the batched result."""
        if self._closed:
            raise NotReady("the model is being replaced: retry")
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self.counts.requests += 1
        self._pending.append((inputs, future))
        self._arrived.set()
        return await future

    def _take(self) -> list[_Item]:
        """Everything queued that can share a run with the first request, up to ``max_batch_size`` samples."""
        first = self._pending.popleft()
        batch, rows, shapes = [first], _rows(first), _shapes(first)
        if rows >= self.max_batch_size:
            return batch
        skipped: list[_Item] = []
        while self._pending and rows < self.max_batch_size:
            item = self._pending.popleft()
            if _shapes(item) == shapes and rows + _rows(item) <= self.max_batch_size:
                batch.append(item)
                rows += _rows(item)
            else:
                skipped.append(item)
        self._pending.extendleft(reversed(skipped))  # they keep their place in line
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            delay, target = (self.delay_s, self.max_batch_size) if self.delay_s else self._company_wait()
            rows = sum(_rows(i) for i in self._pending)
            if delay and rows < target:
                # company for a batch that is not full: always (max_queue_delay_us), or while it comes
                if not self.delay_s and not self._waiting:
                    self.counts.probes += 1
                else:
                    self.counts.waits += 1
                waiting, deadline = rows, loop.time() + delay
                while rows < target and loop.time() < deadline:
                    self._arrived.clear()
                    if not await wait_event(self._arrived, deadline - loop.time()):
                        break
                    rows = sum(_rows(i) for i in self._pending)
                self.counts.gathered += rows - waiting
                if not self.delay_s:
                    self._company_came(rows - waiting, rows, target)
            self.counts.batches += 1
            await self._execute(self._take())

    def _company_wait(self) -> tuple[float, int]:
        """How long to wait for company, and for how many samples in all (see ``company_delay_us``).

        A server whose gRPC layer costs more than its engine (a small model behind a Python server) would run
        requests one at a time though 32 clients wait: the engine is never busy long enough for a queue to form.
        So it waits while waiting brings company. Waiting starts when a probe (a wait of at most :data:`PROBE_S`,
        on every :data:`PROBE_EVERY`-th run, or at once when two requests are already waiting: a lone client never
        has company) brings a request, and stops when :data:`EMPTY_WAITS` waits in a row brought none; a lone client
        waits only on probes. A wait ends when the batch is full, at the deadline, or — except every
        :data:`EXPLORE_EVERY`-th wait, which stays open to see whether more come — once as many
        samples are there as the last open wait gathered (with 8 clients, 8).
        """
        if not self.company_delay_s:
            return 0.0, self.max_batch_size
        if not self._waiting:
            self._unwaited += 1
            if self._unwaited < PROBE_EVERY and len(self._pending) < 2:
                return 0.0, self.max_batch_size
            self._unwaited = 0
            return min(self.company_delay_s, PROBE_S), self.max_batch_size
        self._waits += 1
        if self._waits % EXPLORE_EVERY == 0:
            return self.company_delay_s, self.max_batch_size
        return self.company_delay_s, min(self.max_batch_size, self._expect)

    def _company_came(self, gained: int, rows: int, target: int) -> None:
        """What a company wait brought: ``gained`` samples, ``rows`` in all, waiting for ``target``."""
        if not self._waiting:  # a probe: its wait was short, so the first real wait stays open
            self._waiting, self._waits, self._empty = gained > 0, -1, 0
            return
        self._empty = 0 if gained else self._empty + 1
        self._waiting = self._empty < EMPTY_WAITS
        if target == self.max_batch_size and gained > 0:  # an open wait: what came is what to expect next time
            self._expect = max(2, rows)

    def _timed(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        started = time.perf_counter()
        outputs = self.engine.infer(inputs)
        return outputs, time.perf_counter() - started

    async def _call(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.counts.runs += 1
        if self._run_s < INLINE_RUN_S:
            outputs, seconds = self._timed(inputs)
        else:  # the engine's own time, taken on its thread: the hand-off and the wait for the GIL are not the run's
            outputs, seconds = await asyncio.get_running_loop().run_in_executor(self._thread, self._timed, inputs)
        self._run_s = 0.8 * self._run_s + 0.2 * seconds if self._run_s < 1.0 else seconds
        if self._on_batch is not None:
            self._on_batch(next(iter(inputs.values())).shape[0], seconds)
        return outputs

    async def _run_one(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request, split into engine-sized runs when it is larger than the engine's batch."""
        rows = next(iter(inputs.values())).shape[0]
        if rows <= self.max_batch_size:
            return await self._call(inputs)
        parts = [await self._call({k: v[s : s + self.max_batch_size] for k, v in inputs.items()})
                 for s in range(0, rows, self.max_batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    async def _execute(self, batch: list[_Item]) -> None:
        if len(batch) == 1:
            inputs, future = batch[0]
            try:
                result = await self._run_one(inputs)
            except Exception as exc:  # noqa: BLE001 - the request gets its own error
                if not future.done():
                    future.set_exception(exc)
                return
            if not future.done():
                future.set_result(result)
            return
        names = list(batch[0][0])
        merged = {n: np.concatenate([inputs[n] for inputs, _ in batch]) for n in names}
        try:
            outputs = await self._call(merged)
        except Exception:  # noqa: BLE001 - find the culprit: each request alone, so only it fails
            for item in batch:
                await self._execute([item])
            return
        offset = 0
        for inputs, future in batch:
            n = next(iter(inputs.values())).shape[0]
            if not future.done():
                future.set_result({k: v[offset : offset + n] for k, v in outputs.items()})
            offset += n

    async def close(self) -> None:
        """Stop accepting, run what is queued, stop the worker and the engine thread."""
        self._closed = True
        self._arrived.set()
        await self._worker
        self._thread.shutdown(wait=True)
