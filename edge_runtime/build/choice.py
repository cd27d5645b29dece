"""Which variant serves on this device: the fastest of those that pass validation here.

Which precision is fastest depends on the model and the device (INT8 pays off for a CNN on a CPU with VNNI, not for
a small transformer, where quantize/dequantize work outweighs the cheaper MatMuls; on a Jetson FP16 and INT8 trade
places by module), so the device measures instead of trusting a static order. Each candidate variant is validated
first; a variant that fails validation is never chosen, whatever its speed. The figures are per-sample latency
at batch 1 and at the serving batch, and the variant with the lowest geometric mean of the two wins (batch 1
matters to a lone client, the serving batch to a busy server). The choice is saved next to the version's engines,
keyed by the candidates' target keys, so a restart does not measure again.

This module measures and decides; it never changes what serves.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.build.engines.base import Engine
from edgeloop_core.files import write_atomic
from edgeloop_core.timing import Timing, repeat_batch, time_calls

CHOICE_FILE = "variant-choice.json"


@dataclass(frozen=True)
class VariantFigures:
    """One candidate, as measured on this device."""

    variant: str
    target_key: str
    passed: bool
    """Whether it passed on-device validation (a failed variant is never chosen)."""
    metric_value: float | None = None
    batch: int = 1
    """The serving batch it was timed at (besides batch 1)."""
    b1: Timing | None = None
    batched: Timing | None = None
    reason: str = ""
    """Why it failed, when it did."""

    @property
    def score_ms(self) -> float:
        """Geometric mean of the per-sample p50 at batch 1 and at the serving batch (lower is faster)."""
        if self.b1 is None or self.batched is None:
            return math.inf
        return math.sqrt(self.b1.p50_ms * self.batched.p50_ms / self.batch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, with the score."""
        data = asdict(self)
        data["score_ms"] = None if math.isinf(self.score_ms) else round(self.score_ms, 4)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantFigures:
        """Read what :meth:`to_dict` wrote."""
        values = {k: v for k, v in data.items() if k != "score_ms"}
        for name in ("b1", "batched"):
            if values.get(name) is not None:
                values[name] = Timing(**values[name])
        return cls(**values)


@dataclass(frozen=True)
class VariantChoice:
    """What serves, why, and the figures behind it."""

    chosen: str
    reason: str
    mode: str
    """``measured`` (fastest here), ``cached`` (measured before, on this device), ``forced`` (the ``variant``
    setting) or ``static`` (one candidate, or measuring turned off: the first in preference order)."""
    figures: list[VariantFigures] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (telemetry, ``fleet status``)."""
        return {"chosen": self.chosen, "reason": self.reason, "mode": self.mode,
                "figures": [f.to_dict() for f in self.figures]}


def time_variant(engine: Engine, sample: dict[str, np.ndarray], batch: int, *,
                 budget_s: float) -> tuple[Timing, Timing]:
    """p50/p99 of ``engine`` at batch 1 and at ``batch`` on copies of one validation sample, within about
    ``budget_s`` seconds in all (half for each batch size)."""
    one, many = repeat_batch(sample, 1), repeat_batch(sample, batch)
    half = max(budget_s / 2, 1e-3)
    return (time_calls(lambda: engine.infer(one), runs=10_000, warmup=3, budget_s=half),
            time_calls(lambda: engine.infer(many), runs=10_000, warmup=2, budget_s=half))


def choose_fastest(figures: list[VariantFigures]) -> VariantChoice | None:
    """The fastest variant that passed validation (ties go to the earlier, preferred one); ``None`` when none
    passed."""
    passed = [f for f in figures if f.passed]
    if not passed:
        return None
    best = min(passed, key=lambda f: f.score_ms)
    others = [f for f in passed if f is not best]
    if others:
        runner_up = min(others, key=lambda f: f.score_ms)
        ratio = runner_up.score_ms / best.score_ms if best.score_ms > 0 else 1.0
        reason = (f"{ratio:.2f}x faster than {runner_up.variant}; fastest of {len(passed)} validated variants: "
                  f"{best.b1.p50_ms:.3f} ms at batch 1, {best.batched.p50_ms:.3f} ms at batch {best.batch}")  # type: ignore[union-attr]
    else:
        reason = "the only variant that passed validation here"
    failed = [f"{f.variant} ({f.reason})" for f in figures if not f.passed]
    if failed:
        reason += "; failed: " + ", ".join(failed)
    return VariantChoice(best.variant, reason, "measured", figures)


def load_choice(directory: Path, candidates: dict[str, str]) -> VariantChoice | None:
    """A choice saved for exactly these ``candidates`` (variant → target key), or ``None``."""
    try:
        data = json.loads((directory / CHOICE_FILE).read_text())
        if data.get("candidates") != candidates or data.get("chosen") not in candidates:
            return None
        figures = [VariantFigures.from_dict(f) for f in data.get("figures", [])]
        return VariantChoice(data["chosen"], f"measured earlier on this device: {data.get('reason', '')}", "cached",
                             figures)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def save_choice(directory: Path, candidates: dict[str, str], choice: VariantChoice) -> None:
    """Remember ``choice`` for these ``candidates`` (written atomically)."""
    write_atomic(directory / CHOICE_FILE, json.dumps({"candidates": candidates, **choice.to_dict()}).encode())
