"""Dynamic batching that takes what is waiting and never waits for nothing.

When the engine is free, every queued request that fits (same non-batch shapes, at most ``max_batch_size`` samples
in all) runs now, in one engine call; a request that arrives while the engine is busy waits for the next call,
and the queue fills meanwhile — that, not a timer, is what forms batches under load. ``max_queue_delay_us`` (Triton's
``max_queue_delay_microseconds``) is an optional extra wait for company when the engine is free and the batch is not
full; it is 0 by default, so a lone request runs at once. Where the server, not the engine, is the bottleneck (a
small model behind Python gRPC, which hands requests over one at a time) the engine is never busy long enough for a
queue to form, so ``company_delay_us`` waits for company only while waiting brings it (see
:meth:`DynamicBatcher._company_wait`): a lone client is not kept waiting, 32 clients get full batches. Whether
company comes is found out by short probes (:meth:`DynamicBatcher._probe`: :data:`PROBE_S`, then a few event-loop
turns), not an asyncio timer, which is good to about a millisecond: a lone client, who has nobody to bring, loses a
few hundred microseconds on a probe, not a millisecond, and probes that find nobody come ever more rarely
(:data:`PROBE_EVERY` runs apart, doubling to :data:`PROBE_EVERY_MAX`), so they stay out of its 99th percentile. A
request
larger than the engine's batch is split into several runs and reassembled (the largest request is the server's
business, the largest engine batch the engine's). Errors are isolated: a failing merged run is retried
request by request, so one bad request fails alone.

The engine runs on one dedicated thread per batcher (ONNX Runtime and TensorRT release the GIL while they compute),
so the event loop stays free and no thread pool is shared with anything else — except when runs are so short
(under :data:`INLINE_RUN_S`, measured as a moving average) that handing them to a thread costs more than the run
itself (14% of the server's CPU for the digits CNN, by py-spy): those run inline on the event loop. A request that
finds the engine idle, nothing queued and no wait due runs at once on its caller's turn (:meth:`DynamicBatcher.infer`
counts it as ``direct``): no hand-off to the worker task and back, two event-loop turns a lone request would pay.

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
PROBE_EVERY = 16
"""With ``company_delay_us``: after this many runs without waiting, one run waits to see whether company comes; the
interval doubles after each probe that found nobody, up to :data:`PROBE_EVERY_MAX`, and is back here once one finds
company (load that just stopped may come back)."""
PROBE_EVERY_MAX = 256
"""The longest interval between probes, in runs: a lone client's probes are then well under 1% of its requests, and
load arriving after a quiet spell runs at most this many requests unbatched."""
PROBE_S = 200e-6
"""With ``company_delay_us``: how long a probe lets the event loop block in its poller (see ``_probe``), s."""
PROBE_TURNS = 8
"""With ``company_delay_us``: the event-loop turns a probe then gives handlers to reach the batcher."""
BATCHING_PAYS = 1.1
"""Batching pays when a sample costs at least this much less in the largest batches run than alone (moving averages
of seconds per sample); where it does not (a compute-bound model on a CPU), runs are kept near :data:`RUN_S`."""
RUN_S = 8e-3
"""Where batching does not pay: the engine time a batch is kept to (at least 2 samples). A long run makes its
clients' answers, and so their next requests, come in bursts, and a request that just missed a run waits a whole
one: batches of 16 of a 1.5 ms CNN left the 99th percentile at twice the median (issue 25); batches of about 5 keep
it within 1.25x and, the per-run costs shared, serve ~5% more than batches of 2 (bench/serve, large model)."""
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
    """``company_delay_us`` probes taken: short looks for company (:data:`PROBE_S` and :data:`PROBE_TURNS` turns)."""
    gathered: int = 0
    """Samples that arrived during waits and probes (what waiting brought)."""
    direct: int = 0
    """Requests run at once on their caller's turn (engine idle, nothing queued, no wait due, runs short enough to
    run inline): batches of one that skipped the hand-off to the worker task."""


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
        self._idle = False  # the worker waits for a request with nothing queued (see _may_run_now)
        self._unwaited = self._waits = self._empty = 0
        self._probe_every = PROBE_EVERY  # runs between probes (see _company_came)
        self._expect = self.max_batch_size  # samples the last open-ended wait gathered
        self._sample_s: dict[int, float] = {}  # batch size (power of 2, rounded down) -> moving average s/sample
        self.batch_limit = self.max_batch_size
        """The most samples one batch gathers from several requests: ``max_batch_size``, or less where batching
        does not pay (see :meth:`_measure`)."""
        self._on_batch = on_batch
        self._pending: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeloop-engine")
        self._run_s = 1.0  # moving average of one engine run; starts high so the first runs use the thread
        self.counts = BatchingCounts()
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="edgeloop-batcher")

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (batch axis first) and wait for its rows of the batched result; run it at once when
        nothing would be gained by queueing it (:meth:`_may_run_now`)."""
        if self._closed:
            raise NotReady("the model is being replaced: retry")
        self.counts.requests += 1
        if self._may_run_now(inputs):
            self.counts.batches += 1
            self.counts.direct += 1
            self.counts.runs += 1
            outputs, *seconds = self._timed(inputs)  # on this turn: nothing else runs the engine meanwhile
            self._ran(inputs, *seconds)
            return outputs
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self._pending.append((inputs, future))
        self._arrived.set()
        return await future

    def _may_run_now(self, inputs: dict[str, np.ndarray]) -> bool:
        """Whether this request may run at once, on its caller's turn: the worker is idle with nothing queued,
        runs are short enough to run inline, the request fits one run, and no wait for company is due for it
        (``max_queue_delay_us`` waits unless the batch is full; ``company_delay_us`` while waiting brings company,
        and on probes, counted here as :meth:`_company_wait` counts them)."""
        if not self._idle or self._pending or self._run_s >= INLINE_RUN_S:
            return False
        rows = next(iter(inputs.values())).shape[0]
        if rows >= self.batch_limit:
            return rows <= self.max_batch_size
        if self.delay_s:
            return False
        if self.company_delay_s:
            if self._waiting or self._unwaited + 1 >= self._probe_every:
                return False
            self._unwaited += 1
        return True

    def _take(self) -> list[_Item]:
        """Everything queued that can share a run with the first request, up to :attr:`batch_limit` samples."""
        first = self._pending.popleft()
        batch, rows, shapes = [first], _rows(first), _shapes(first)
        if rows >= self.batch_limit:
            return batch
        skipped: list[_Item] = []
        while self._pending and rows < self.batch_limit:
            item = self._pending.popleft()
            if _shapes(item) == shapes and rows + _rows(item) <= self.batch_limit:
                batch.append(item)
                rows += _rows(item)
            else:
                skipped.append(item)
        self._pending.extendleft(reversed(skipped))  # they keep their place in line
        return batch

    def _queued(self) -> int:
        return sum(_rows(i) for i in self._pending)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._arrived.clear()
                self._idle = True
                try:
                    await self._arrived.wait()
                finally:
                    self._idle = False
                continue
            delay, target = (self.delay_s, self.batch_limit) if self.delay_s else self._company_wait()
            rows = self._queued()
            if delay and rows < target:
                # company for a batch that is not full: always (max_queue_delay_us), or while it comes
                probe = not self.delay_s and not self._waiting
                if probe:
                    self.counts.probes += 1
                else:
                    self.counts.waits += 1
                gathered = await (self._probe(rows, target) if probe else self._wait(rows, target, delay))
                self.counts.gathered += gathered - rows
                if not self.delay_s:
                    self._company_came(gathered - rows, gathered, target)
            self.counts.batches += 1
            await self._execute(self._take())

    async def _wait(self, rows: int, target: int, delay: float) -> int:
        """Wait until ``target`` samples are queued, at most ``delay`` seconds; the samples queued then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while rows < target and loop.time() < deadline:
            self._arrived.clear()
            if not await wait_event(self._arrived, deadline - loop.time()):
                break
            rows = self._queued()
        return rows

    async def _probe(self, rows: int, target: int) -> int:
        """Look for company: :data:`PROBE_S` of sleep on the (idle) engine thread, during which the event loop blocks
        in its poller as it does when idle, so gRPC's own threads, which need the core to read the network, run and
        hand over what they hold; then :data:`PROBE_TURNS` event-loop turns (until ``target`` samples are queued)
        for the handlers to reach the batcher. The samples queued then. (Turns alone would find nothing on one core:
        the loop never lets gRPC's threads run; an asyncio timer would cost a lone client a millisecond.)"""
        await asyncio.get_running_loop().run_in_executor(self._thread, time.sleep, PROBE_S)
        rows = self._queued()
        for _ in range(PROBE_TURNS):
            if rows >= target:
                break
            await asyncio.sleep(0)
            rows = self._queued()
        return rows

    def _company_wait(self) -> tuple[float, int]:
        """How long to wait for company, and for how many samples in all (see ``company_delay_us``).

        A server whose gRPC layer costs more than its engine (a small model behind a Python server) would run
        requests one at a time though 32 clients wait: the engine is never busy long enough for a queue to form.
        So it waits while waiting brings company. Waiting starts when a probe (:meth:`_probe`, a few hundred
        microseconds, every :data:`PROBE_EVERY` to :data:`PROBE_EVERY_MAX` runs, or at once when two requests are
        already waiting: a lone client never has company) brings a request, and stops when :data:`EMPTY_WAITS` waits
        in a row brought none; a lone client waits only on probes. A wait ends when the batch is full, at the
        deadline, or — except every :data:`EXPLORE_EVERY`-th wait, which stays open to see whether more come — once
        as many samples are there as the last open wait gathered (with 8 clients, 8).
        """
        limit = self.batch_limit
        if not self.company_delay_s:
            return 0.0, limit
        if not self._waiting:
            self._unwaited += 1
            if self._unwaited < self._probe_every and len(self._pending) < 2:
                return 0.0, limit
            self._unwaited = 0
            return self.company_delay_s, limit  # a probe (_probe), not this long
        self._waits += 1
        if self._waits % EXPLORE_EVERY == 0:
            return self.company_delay_s, limit
        return self.company_delay_s, min(limit, self._expect)

    def _company_came(self, gained: int, rows: int, target: int) -> None:
        """What a company wait brought: ``gained`` samples, ``rows`` in all, waiting for ``target``."""
        if not self._waiting:  # a probe: its look was short, so the first real wait stays open
            self._waiting, self._waits, self._empty = gained > 0, -1, 0
            self._probe_every = PROBE_EVERY if gained else min(PROBE_EVERY_MAX, 2 * self._probe_every)
            return
        self._empty = 0 if gained else self._empty + 1
        self._waiting = self._empty < EMPTY_WAITS
        if target >= self.batch_limit and gained > 0:  # an open wait: what came is what to expect next time
            self._expect = max(2, rows)

    def _timed(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, float]:
        """Run the engine: its outputs, the run's wall seconds and the CPU seconds of the calling thread (what the
        run cost, without the time other threads of this core took meanwhile)."""
        started, cpu = time.perf_counter(), time.thread_time()
        outputs = self.engine.infer(inputs)
        return outputs, time.perf_counter() - started, time.thread_time() - cpu

    async def _call(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.counts.runs += 1
        if self._run_s < INLINE_RUN_S:
            outputs, *seconds = self._timed(inputs)
        else:  # the engine's own time, taken on its thread: the hand-off and the wait for the GIL are not the run's
            outputs, *seconds = await asyncio.get_running_loop().run_in_executor(self._thread, self._timed, inputs)
        self._ran(inputs, *seconds)
        return outputs

    def _ran(self, inputs: dict[str, np.ndarray], seconds: float, cpu_s: float) -> None:
        """Account for one engine run of ``inputs`` that took ``seconds`` (``cpu_s`` of its thread's CPU): the
        moving average that decides what runs inline, the cost per sample that sets :attr:`batch_limit`, and the
        batch callback (metrics)."""
        self._run_s = 0.8 * self._run_s + 0.2 * seconds if self._run_s < 1.0 else seconds
        self._measure(next(iter(inputs.values())).shape[0], cpu_s)
        if self._on_batch is not None:
            self._on_batch(next(iter(inputs.values())).shape[0], seconds)

    def _measure(self, rows: int, seconds: float) -> None:
        """Keep the cost per sample by batch size (CPU ``seconds`` of the running thread, so that what other threads
        of a shared core did meanwhile does not count; moving averages, sizes rounded down to a power of 2) and set
        :attr:`batch_limit`: ``max_batch_size`` while batching pays (:data:`BATCHING_PAYS`: a sample alone costs that
        much more than in the largest batches run) or before both were measured, else batches of about
        :data:`RUN_S` of engine time."""
        size = 1 << (rows.bit_length() - 1)
        per_sample = seconds / rows
        known = self._sample_s.get(size)
        self._sample_s[size] = per_sample if known is None else 0.8 * known + 0.2 * per_sample
        largest = max(self._sample_s)
        if largest == 1 or 1 not in self._sample_s:
            return
        alone = self._sample_s[1]
        if alone >= BATCHING_PAYS * self._sample_s[largest]:
            self.batch_limit = self.max_batch_size
        else:
            self.batch_limit = max(2, min(self.max_batch_size, round(RUN_S / max(alone, 1e-9))))

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
