"""Which variant serves on this device: the fastest of those that pass validation here.

Which precision is fastest depends on the model and the device (INT8 pays off for a CNN on a CPU with VNNI, not for
a small transformer, where quantize/dequantize work outweighs the cheaper MatMuls; on a Jetson FP16 and INT8 trade
places by module), so the device measures instead of trusting a static order. Each candidate variant is validated
first; a variant that fails validation is never chosen, whatever its speed. The figures are per-sample latency
at batch 1 and at the serving batch, and the variant with the lowest geometric mean of the two wins (batch 1
matters to a lone client, the serving batch to a busy server). That is the ``balanced`` objective (the default);
``latency`` ranks by batch 1 alone, ``throughput`` by the serving batch alone, and ``energy`` by millijoules per
inference where the device has power rails (:mod:`edge_runtime.build.power`: the module's energy integrated while
the same timing runs go; a device without rails falls back to ``balanced`` and says so). The choice is saved next
to the version's engines, keyed by the candidates' target keys and the objective, so a restart does not measure
again.

This module measures and decides; it never changes what serves.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_runtime.build.engines.base import Engine
from edge_runtime.build.power import PowerSampler, time_with_energy
from edgeloop_core.files import write_atomic
from edgeloop_core.timing import Timing, repeat_batch

CHOICE_FILE = "variant-choice.json"
Objective = Literal["balanced", "latency", "throughput", "energy"]
OBJECTIVES: tuple[str, ...] = ("balanced", "latency", "throughput", "energy")


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
    b1_mj: float | None = None
    """Module energy per inference at batch 1, mJ (``None``: no power rails here)."""
    batched_mj: float | None = None
    """Module energy per inference (per sample) at the serving batch, mJ (``None``: no power rails here)."""

    @property
    def score_ms(self) -> float:
        """Geometric mean of the per-sample p50 at batch 1 and at the serving batch (lower is faster)."""
        if self.b1 is None or self.batched is None:
            return math.inf
        return math.sqrt(self.b1.p50_ms * self.batched.p50_ms / self.batch)

    @property
    def mj_per_inference(self) -> float | None:
        """Geometric mean of the energy per inference at batch 1 and at the serving batch, mJ (the same weighting
        as :attr:`score_ms`); ``None`` where power was not measured."""
        if self.b1_mj is None or self.batched_mj is None:
            return None
        return math.sqrt(self.b1_mj * self.batched_mj)

    def rank(self, objective: str) -> tuple[float, float]:
        """Sort key under ``objective``, lower is better: ``(the objective's figure, score_ms)``. A missing figure is
        ``inf``, so under ``energy`` a variant without an energy figure comes after those with one, and without any
        (no power rails) the order is ``balanced``'s."""
        if objective == "energy":
            primary = math.inf if self.mj_per_inference is None else self.mj_per_inference
        elif self.b1 is None or self.batched is None:
            primary = math.inf
        elif objective == "latency":
            primary = self.b1.p50_ms
        elif objective == "throughput":
            primary = self.batched.p50_ms / self.batch  # per sample: the inverse of samples per second
        else:
            primary = self.score_ms
        return primary, self.score_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, with the score and the energy figure."""
        data = asdict(self)
        data["score_ms"] = None if math.isinf(self.score_ms) else round(self.score_ms, 4)
        data["mj_per_inference"] = self.mj_per_inference
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantFigures:
        """Read what :meth:`to_dict` wrote."""
        values = {k: v for k, v in data.items() if k not in ("score_ms", "mj_per_inference")}
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
    """``measured`` (best here), ``cached`` (measured before, on this device), ``forced`` (the ``variant``
    setting) or ``static`` (one candidate, or measuring turned off: the first in preference order)."""
    figures: list[VariantFigures] = field(default_factory=list)
    objective: str = "balanced"
    """What ``measured`` optimised: balanced, latency, throughput or energy."""

    @property
    def mj_per_inference(self) -> float | None:
        """The chosen variant's energy per inference, mJ, where it was measured (else ``None``, never 0)."""
        chosen = [f for f in self.figures if f.variant == self.chosen and f.passed]
        return chosen[0].mj_per_inference if chosen else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (telemetry, ``fleet status``)."""
        return {"chosen": self.chosen, "reason": self.reason, "mode": self.mode, "objective": self.objective,
                "mj_per_inference": self.mj_per_inference, "figures": [f.to_dict() for f in self.figures]}


@dataclass(frozen=True)
class VariantMeasure:
    """A variant's timing runs: batch 1 and the serving batch, each with its energy per inference (mJ) where the
    device has power rails."""

    b1: Timing
    batched: Timing
    batch: int
    b1_mj: float | None = None
    batched_mj: float | None = None

    def figures(self, variant: str, target_key: str, metric_value: float | None) -> VariantFigures:
        """The figures of a variant that passed validation, as measured here."""
        return VariantFigures(variant, target_key, True, metric_value, self.batch, self.b1, self.batched,
                              b1_mj=self.b1_mj, batched_mj=self.batched_mj)


def measure_variant(engine: Engine, sample: dict[str, np.ndarray], batch: int, *, budget_s: float,
                    power: PowerSampler | None = None) -> VariantMeasure:
    """p50/p99 of ``engine`` at batch 1 and at ``batch`` on copies of one validation sample, within about
    ``budget_s`` seconds in all (half for each batch size), and the module's energy per inference during each run
    where ``power`` has rails."""
    one, many = repeat_batch(sample, 1), repeat_batch(sample, batch)
    half = max(budget_s / 2, 1e-3)
    b1, b1_mj = time_with_energy(lambda: engine.infer(one), 1, power=power, runs=10_000, warmup=3, budget_s=half)
    batched, batched_mj = time_with_energy(lambda: engine.infer(many), batch, power=power, runs=10_000, warmup=2,
                                           budget_s=half)
    return VariantMeasure(b1, batched, batch, b1_mj, batched_mj)


def time_variant(engine: Engine, sample: dict[str, np.ndarray], batch: int, *,
                 budget_s: float) -> tuple[Timing, Timing]:
    """:func:`measure_variant` without power: the two timings."""
    measured = measure_variant(engine, sample, batch, budget_s=budget_s)
    return measured.b1, measured.batched


def _why(best: VariantFigures, runner_up: VariantFigures | None, objective: str, passed: int) -> str:
    """The reason line of a measured choice."""
    if runner_up is None:
        return "the only variant that passed validation here"
    ratio = runner_up.rank(objective)[0] / best.rank(objective)[0] if best.rank(objective)[0] > 0 else 1.0
    assert best.b1 is not None and best.batched is not None
    speed = f"{best.b1.p50_ms:.3f} ms at batch 1, {best.batched.p50_ms:.3f} ms at batch {best.batch}"
    if objective == "energy":
        return (f"{ratio:.2f}x less energy than {runner_up.variant}; lowest of {passed} validated variants: "
                f"{best.mj_per_inference:.4f} mJ/inference ({speed})")
    what = {"latency": "faster at batch 1 than", "throughput": "the throughput of"}.get(objective, "faster than")
    best_at = {"latency": "fastest at batch 1", "throughput": "highest throughput"}.get(objective, "fastest")
    return f"{ratio:.2f}x {what} {runner_up.variant}; {best_at} of {passed} validated variants: {speed}"


def choose_variant(figures: list[VariantFigures], objective: str = "balanced") -> VariantChoice | None:
    """The best variant under ``objective`` among those that passed validation (ties go to the earlier, preferred
    one); ``None`` when none passed. Under ``energy`` a variant without an energy figure ranks after those with
    one; with none at all (no power rails) the choice is ``balanced``'s, and the reason says so."""
    passed = [f for f in figures if f.passed]
    if not passed:
        return None
    best = min(passed, key=lambda f: f.rank(objective))
    others = [f for f in passed if f is not best]
    runner_up = min(others, key=lambda f: f.rank(objective)) if others else None
    if objective == "energy" and best.mj_per_inference is None:
        reason = _why(best, runner_up, "balanced", len(passed)) + (
            " (objective energy, but this device gave no energy figure: balanced instead)")
    elif objective == "energy" and runner_up is not None and runner_up.mj_per_inference is None:
        reason = (f"the lowest energy figure, {best.mj_per_inference:.4f} mJ/inference; "
                  f"{', '.join(f.variant for f in others if f.mj_per_inference is None)} gave none")
    else:
        reason = _why(best, runner_up, objective, len(passed))
    failed = [f"{f.variant} ({f.reason})" for f in figures if not f.passed]
    if failed:
        reason += "; failed: " + ", ".join(failed)
    return VariantChoice(best.variant, reason, "measured", figures, objective)


def choose_fastest(figures: list[VariantFigures]) -> VariantChoice | None:
    """:func:`choose_variant` under the ``balanced`` objective."""
    return choose_variant(figures, "balanced")


def load_choice(directory: Path, candidates: dict[str, str], objective: str = "balanced") -> VariantChoice | None:
    """A choice saved for exactly these ``candidates`` (variant → target key) under ``objective``, or ``None``
    (a file from before objectives existed counts as ``balanced``)."""
    try:
        data = json.loads((directory / CHOICE_FILE).read_text())
        if data.get("candidates") != candidates or data.get("chosen") not in candidates:
            return None
        saved = data.get("objective", "balanced")
        if objective != saved:
            return None
        figures = [VariantFigures.from_dict(f) for f in data.get("figures", [])]
        return VariantChoice(data["chosen"], f"measured earlier on this device: {data.get('reason', '')}", "cached",
                             figures, saved)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def save_choice(directory: Path, candidates: dict[str, str], choice: VariantChoice) -> None:
    """Remember ``choice`` for these ``candidates`` (written atomically)."""
    write_atomic(directory / CHOICE_FILE, json.dumps({"candidates": candidates, **choice.to_dict()}).encode())
