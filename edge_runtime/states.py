"""The states of one model's life cycle: one enum for the runtime, metrics, health, telemetry and the servicer."""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    """Where a model is in its life cycle (the value is what telemetry, metrics and annotations show)."""

    STARTING = "starting"
    FETCHING = "fetching"
    BUILDING = "building"
    VALIDATING = "validating"
    SERVING = "serving"
    FAILED = "failed"
    UNLOADED = "unloaded"

    def __str__(self) -> str:
        return self.value

    @property
    def loading(self) -> bool:
        """Work in progress towards a new version (the repository index says LOADING)."""
        return self in (State.FETCHING, State.BUILDING, State.VALIDATING)
