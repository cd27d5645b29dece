"""Dynamic batching: concurrent requests are merged into one engine run of at most ``max_batch_size`` samples,
waiting at most ``max_queue_delay_us`` for company. The engine runs in a worker thread; the event loop stays free."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_runtime.engines.base import Engine
from edge_runtime.errors import NotReady

_Item = tuple[dict[str, np.ndarray], "asyncio.Future[dict[str, np.ndarray]]"]
_STOP = object()


def _rows(item: _Item) -> int:
    return next(iter(item[0].values())).shape[0]


def _shapes(item: _Item) -> tuple[tuple[int, ...], ...]:
    """Non-batch shapes: only requests that agree on them can share a run (dynamic axes)."""
    return tuple(value.shape[1:] for value in item[0].values())


class DynamicBatcher:
    """One worker task per engine. :meth:`close` finishes every request already queued before it returns."""

    def __init__(self, engine: Engine, *, max_batch_size: int, max_queue_delay_us: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        self._on_batch = on_batch
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._carry: collections.deque[_Item] = collections.deque()
        self._closed = False
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="edgeloop-batcher")

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one request (batch axis first) and wait for its slice of the batched result."""
        if self._closed:
            raise NotReady("the model is being replaced: retry")
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((inputs, future))
        return await future

    async def _next(self, timeout: float | None) -> Any:
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._next(None)
            if first is _STOP:
                break
            batch, rows = [first], _rows(first)
            deadline = loop.time() + self.delay_s
            while rows < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._queue.empty() and not self._carry:
                    break
                try:
                    item = await self._next(max(remaining, 0.0))
                except (asyncio.TimeoutError, TimeoutError):
                    break
                if item is _STOP:
                    stopping = True
                    break
                if rows + _rows(item) > self.max_batch_size or _shapes(item) != _shapes(first):
                    self._carry.append(item)
                    break
                batch.append(item)
                rows += _rows(item)
            await self._execute(batch, rows)
        while self._carry:  # requests that were waiting for room in a batch
            item = self._carry.popleft()
            await self._execute([item], _rows(item))

    async def _execute(self, batch: list[_Item], rows: int) -> None:
        names = list(batch[0][0])
        merged = {n: np.concatenate([inputs[n] for inputs, _ in batch]) if len(batch) > 1 else batch[0][0][n]
                  for n in names}
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            outputs = await asyncio.to_thread(self.engine.infer, merged)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(rows, loop.time() - started)
        offset = 0
        for inputs, future in batch:
            n = next(iter(inputs.values())).shape[0]
            if not future.done():
                future.set_result({k: v[offset : offset + n] for k, v in outputs.items()})
            offset += n

    async def close(self) -> None:
        """Stop accepting, run what is queued, stop the worker."""
        self._closed = True
        self._queue.put_nowait(_STOP)
        await self._worker
