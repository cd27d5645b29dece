"""A model's capture budgets: items per hour and bytes per day, over sliding windows (kept in memory: a restart
starts them afresh)."""

from __future__ import annotations

from collections import deque

HOUR_S, DAY_S = 3600.0, 86400.0


class Budget:
    """Whether one more item of ``size`` bytes fits ``items_per_hour`` and ``bytes_per_day`` (``None``: no cap)."""

    def __init__(self, items_per_hour: int | None, bytes_per_day: int | None) -> None:
        self.items_per_hour, self.bytes_per_day = items_per_hour, bytes_per_day
        self._items: deque[float] = deque()
        self._bytes: deque[tuple[float, int]] = deque()
        self._bytes_total = 0

    def _expire(self, now_s: float) -> None:
        while self._items and self._items[0] <= now_s - HOUR_S:
            self._items.popleft()
        while self._bytes and self._bytes[0][0] <= now_s - DAY_S:
            self._bytes_total -= self._bytes.popleft()[1]

    def refusal(self, now_s: float, size: int = 0) -> str | None:
        """Why one more item would overspend (``budget_items`` or ``budget_bytes``), ``None`` when it fits."""
        self._expire(now_s)
        if self.items_per_hour is not None and len(self._items) >= self.items_per_hour:
            return "budget_items"
        if self.bytes_per_day is not None and self._bytes_total + size > self.bytes_per_day:
            return "budget_bytes"
        return None

    def spend(self, now_s: float, size: int) -> None:
        """Count one item of ``size`` bytes taken at ``now_s`` (seconds)."""
        self._items.append(now_s)
        self._bytes.append((now_s, size))
        self._bytes_total += size
