"""asyncio helpers the runtime's loops share."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds; True when it was set.

    ``asyncio.wait_for(event.wait(), timeout)`` does the same, except that before Python 3.12 (JetPack 6 runs 3.10)
    it swallows a cancellation that arrives while the event is being set (python/cpython#86296): a loop that waits
    for wake-ups then never ends when its task is cancelled. Here the cancellation always propagates."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(0.0, timeout))
    finally:
        waiter.cancel()
    return bool(done)
