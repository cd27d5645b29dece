"""Engines obtained within the device's memory budget, and the books on what each open engine holds.

An engine is obtained only when its memory needs fit what is free: checked before with what it held when it was
last loaded here (or, never loaded here, with its weights), and after with what loading it took. From then on it
holds that much of the :class:`~edge_runtime.build.memory.MemoryBudget`, under a holder name
(``model/version/variant#n``), until it is dropped or whoever took it over releases it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgeloop_core.errors import InsufficientMemory

if TYPE_CHECKING:
    from edge_runtime.build.engines.base import Engine
    from edge_runtime.build.engines.provider import EngineProvider
    from edge_runtime.build.engines.select import EnginePlan
    from edge_runtime.build.memory import MemoryBudget
    from edgeloop_core.contract import Manifest


def _what(manifest: Manifest, plan: EnginePlan) -> str:
    """How memory messages name an engine: ``name/version (variant)``."""
    return f"{manifest.name}/{manifest.version} ({plan.variant.name})"


class EngineLoader:
    """One model's engines, from the device's shared provider, against its shared memory budget. Called from worker
    threads, one bring-up at a time per model."""

    def __init__(self, engines: EngineProvider, memory: MemoryBudget) -> None:
        self.engines = engines
        self.memory = memory
        self._holders: dict[int, str] = {}
        """Open engine (by id) → its name in the memory budget."""
        self._loads = 0

    def check(self, manifest: Manifest, plan: EnginePlan) -> None:
        """:class:`InsufficientMemory` unless the engine for ``plan`` fits what is free: by what it held when it was
        last loaded here, or (never loaded here) by its weights."""
        what = _what(manifest, plan)
        recorded = self.engines.recorded_memory(manifest, plan)
        if recorded is not None:
            self.memory.check(what, recorded, basis="recorded when it was last loaded here")
        else:
            self.memory.check(what, plan.variant.size_bytes, basis="its weights; it was never loaded here")

    def fitting(self, manifest: Manifest, plans: list[EnginePlan]) -> list[EnginePlan]:
        """The plans whose engines fit the memory budget; none: :class:`InsufficientMemory` with every reason."""
        fitting, reasons = [], []
        for plan in plans:
            try:
                self.check(manifest, plan)
                fitting.append(plan)
            except InsufficientMemory as exc:
                reasons.append(str(exc))
        if not fitting:
            raise InsufficientMemory("; ".join(reasons))
        return fitting

    def obtain(self, manifest: Manifest, plan: EnginePlan, model_path: Path, *, max_batch_size: int,
               local_only: bool = False) -> tuple[Engine, str, list[str]]:
        """The engine for ``plan`` (with where it came from, and notes) if its memory needs fit the budget, before
        and after loading it, else :class:`InsufficientMemory`. What it holds counts against the budget until
        :meth:`drop` or :meth:`release`."""
        what = _what(manifest, plan)
        self.check(manifest, plan)
        engine, source, notes = self.engines.obtain(manifest, plan, model_path, local_only=local_only,
                                                    max_batch_size=max_batch_size)
        measured = int(getattr(engine, "memory_bytes", 0) or 0)
        try:
            self.memory.check(what, measured, basis="measured as it loaded")
        except InsufficientMemory:
            engine.close()
            raise
        self.engines.record_memory(manifest, plan, measured)
        self._loads += 1
        holder = f"{manifest.name}/{manifest.version}/{plan.variant.name}#{self._loads}"
        self._holders[id(engine)] = holder
        self.memory.hold(holder, measured)
        return engine, source, notes

    def hand_over(self, engine: Engine) -> str:
        """Stop keeping the books on ``engine`` here; returns its holder name, which whoever took the engine over
        gives to :meth:`release` (or :meth:`adopt`) when it is done with it."""
        return self._holders.pop(id(engine), "")

    def adopt(self, engine: Engine, holder: str) -> None:
        """``engine`` now holds what ``holder`` held (the engine Triton serves, in place of the one it replaced)."""
        self._holders[id(engine)] = holder

    def release(self, holder: str) -> None:
        """Give what ``holder`` held back to the budget."""
        self.memory.release(holder)

    def drop(self, engine: Engine) -> None:
        """Close an engine that will not serve, and give its memory back to the budget."""
        engine.close()
        self.memory.release(self.hand_over(engine))
