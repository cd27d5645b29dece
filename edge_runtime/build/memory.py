"""The device's memory budget for engines: a model loads only when its engine's memory needs fit what is free.

On a Jetson the CPU and the GPU share one RAM, so an engine that does not fit is not an error CUDA reports: the
kernel's OOM killer ends the pod, and every model on it with it. Before a model's engine is obtained, its recorded
needs (or, before it was ever built, its weights) are checked against what is free, and a model that does not fit
is refused with the figures instead.

"Free" is the configured budget less what the loaded engines hold (``memory_budget_bytes``), or, without a budget,
what the kernel reports available (``MemAvailable``, which already counts the loaded engines) less a reserve.
"""

from __future__ import annotations

import threading
from pathlib import Path

from edgeloop_core.errors import InsufficientMemory

MIB = float(1 << 20)


def _kib_field(path: Path, field: str) -> int | None:
    """``field`` of a ``/proc`` file that lists ``Name:  <n> kB`` lines, in bytes (``None`` where it is missing)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable``: what the kernel can give without swapping, in bytes (``None`` where it does not say)."""
    return _kib_field(meminfo, "MemAvailable")


def resident_bytes(status: Path = Path("/proc/self/status")) -> int | None:
    """This process's resident set (``VmRSS``) in bytes, or ``None``."""
    return _kib_field(status, "VmRSS")


class MemoryBudget:
    """What the loaded engines hold, by holder (``model/version/variant``), and the check before a new one loads.
    Thread-safe: engines are obtained in worker threads."""

    def __init__(self, budget_bytes: int | None = None, reserve_bytes: int = 256 << 20,
                 meminfo: Path = Path("/proc/meminfo")) -> None:
        self.budget_bytes = budget_bytes
        self.reserve_bytes = reserve_bytes
        self.meminfo = meminfo
        self.held: dict[str, int] = {}
        self._lock = threading.Lock()

    def free_bytes(self) -> int | None:
        """What a new engine may use now (``None``: unknown, so nothing is refused)."""
        with self._lock:
            held = sum(self.held.values())
        if self.budget_bytes is not None:
            return self.budget_bytes - held
        available = available_bytes(self.meminfo)
        return None if available is None else available - self.reserve_bytes

    def check(self, what: str, need_bytes: int, *, basis: str) -> None:
        """Raise :class:`InsufficientMemory` when ``need_bytes`` does not fit what is free; ``basis`` says where the
        figure comes from (recorded when the engine was built, or estimated from the weights)."""
        free = self.free_bytes()
        if free is None or need_bytes <= free:
            return
        with self._lock:
            holders = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in sorted(self.held.items())) or "nothing"
        where = (f"the memory budget of {self.budget_bytes / MIB:.1f} MiB" if self.budget_bytes is not None
                 else f"the memory available (less a {self.reserve_bytes / MIB:.0f} MiB reserve)")
        raise InsufficientMemory(f"{what} needs {need_bytes / MIB:.1f} MiB ({basis}) but only {max(free, 0) / MIB:.1f} "
                                 f"MiB of {where} is free (held: {holders}); refusing to load it")

    def hold(self, holder: str, nbytes: int) -> None:
        """Count ``nbytes`` as held by ``holder`` until :meth:`release`."""
        with self._lock:
            self.held[holder] = max(0, int(nbytes))

    def release(self, holder: str) -> None:
        """``holder`` freed its engine."""
        with self._lock:
            self.held.pop(holder, None)
