"""The serving slot: the one place that changes what serves. Look up, swap, unload — each under one lock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeloop_core.errors import ModelNotFound, NotReady

if TYPE_CHECKING:
    from edge_runtime.build.engines import EnginePlan
    from edge_runtime.build.engines.base import Engine
    from edge_runtime.serve.batching import DynamicBatcher
    from edge_runtime.validate import ValidationResult
    from edgeloop_core.contract import Manifest


@dataclass
class ServingModel:
    """A validated model that answers requests."""

    name: str
    version: str
    manifest: Manifest
    plan: EnginePlan
    engine: Engine
    batcher: DynamicBatcher
    validation: ValidationResult
    release_memory: Callable[[], None] | None = None
    """Gives the engine's memory back to the device's budget."""

    async def release(self) -> None:
        """Let requests already queued finish, then free the engine (and its share of the memory budget)."""
        await self.batcher.close()
        self.engine.close()
        if self.release_memory is not None:
            self.release_memory()


class ServingSlot:
    """Holds the serving model (or none). Requests read it without waiting; changes take the lock."""

    def __init__(self) -> None:
        self.current: ServingModel | None = None
        self._lock = asyncio.Lock()

    def lookup(self, name: str, version: str, *, configured: str, state: str) -> ServingModel:
        """The serving model called ``name`` (and ``version`` when given), or the right error. ``configured`` is the
        model this device is meant to serve (so an unknown name is NOT_FOUND, a known one not yet ready UNAVAILABLE)."""
        serving = self.current
        if name != configured and (serving is None or serving.name != name):
            raise ModelNotFound(f"model {name!r} is not served here (this device serves {configured!r})")
        if serving is None:
            raise NotReady(f"model {name!r} is not ready yet ({state})")
        if version and version != serving.version:
            raise ModelNotFound(f"version {version!r} of {name!r} is not served here (serving {serving.version})")
        return serving

    async def swap(self, new: ServingModel) -> ServingModel | None:
        """Serve ``new`` from now on (atomically for requests); the old model is released after its queued requests
        finished, and returned."""
        async with self._lock:
            old, self.current = self.current, new
        if old is not None:
            await old.release()
        return old

    async def unload(self) -> ServingModel | None:
        """Serve nothing; release what served."""
        async with self._lock:
            old, self.current = self.current, None
        if old is not None:
            await old.release()
        return old
