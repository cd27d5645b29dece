"""The events a device reports: the reporter's signature, and how an error reads in one (one line, never empty)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgeloop_core.errors import EdgeloopError

Reporter = Callable[[str, dict[str, Any]], None]
"""``report(kind, payload)``: telemetry events (fetched, built, validated, failed, serving, ...)."""


def describe(exc: BaseException) -> str:
    """One line for an error report: our messages as they are; anything else with its type (never empty)."""
    if isinstance(exc, EdgeloopError) and str(exc):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
