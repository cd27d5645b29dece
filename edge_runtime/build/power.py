"""Energy per inference from the Jetson's own power monitors: the INA3221 rails under hwmon in sysfs.

Where they are (Linux's hwmon ABI for the ina3221 driver, ``Documentation/hwmon/ina3221.rst``, and NVIDIA's
Tegra234 device trees, upstream commit "arm64: tegra: Add power-sensors for Tegra234 boards", 2023)::

    /sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon<N>/in<C>_label   rail name
                                                             in<C>_input   bus voltage, mV
                                                             curr<C>_input current, mA

* Orin NX / Orin Nano (p3767): one INA3221 at ``1-0040``: ``in1`` VDD_IN (the whole module's input),
  ``in2`` VDD_CPU_GPU_CV, ``in3`` VDD_SOC.
* AGX Orin (p3701): ``1-0040`` VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0 and ``1-0041`` VDDQ_VDD2_1V8AO; no VDD_IN
  there, so the module figure is the sum of its rails (what ``jtop`` shows as the total on such a module).

The ``hwmon<N>`` number is assigned at boot, so it is found, never assumed. What is measured is the module's power
while an engine runs, idle draw included (what a battery pays for); it is integrated with the trapezoid rule over
samples a background thread takes at a fixed period (the INA3221 updates its registers every few ms, so a period
of ~10 ms sees every update without burning a core). Where no rail exists (not a Jetson, or ``/sys`` not visible),
:meth:`PowerSampler.measure` gives a reading whose energy is ``None`` — absent, never 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgeloop_core.timing import Timing, time_calls

if TYPE_CHECKING:
    from edge_runtime.settings import EdgeSettings

log = logging.getLogger(__name__)

INA3221_DIR = "sys/bus/i2c/drivers/ina3221"
MODULE_RAIL = "VDD_IN"
"""The whole-module input rail on Orin NX/Nano."""


@dataclass(frozen=True)
class Rail:
    """One monitored rail: its label and the files that give its bus voltage (mV) and current (mA)."""

    label: str
    millivolts: Path
    milliamps: Path

    def read_mw(self) -> float:
        """Power now, milliwatts (mV × mA / 1000)."""
        return int(self.millivolts.read_text()) * int(self.milliamps.read_text()) / 1000.0


def find_rails(root: Path = Path("/")) -> list[Rail]:
    """Every INA3221 rail under ``root`` (``/`` on a device) with a label, a voltage and a current file."""
    rails = []
    for hwmon in sorted((Path(root) / INA3221_DIR).glob("*/hwmon/hwmon*")):
        for label in sorted(hwmon.glob("in*_label")):
            channel = label.name[2:].split("_")[0]
            volts, amps = hwmon / f"in{channel}_input", hwmon / f"curr{channel}_input"
            if volts.exists() and amps.exists():  # in7 ("sum of shunt voltages") has no current file
                try:
                    rails.append(Rail(label.read_text().strip(), volts, amps))
                except OSError:
                    continue
    return rails


def module_rails(rails: list[Rail], wanted: list[str] | None = None) -> list[Rail]:
    """The rails whose sum is the module's power: ``wanted`` by label when given (all must exist, else none),
    else VDD_IN where it exists, else every rail (AGX Orin)."""
    if wanted:
        chosen = [r for r in rails if r.label in wanted]
        return chosen if {r.label for r in chosen} >= set(wanted) else []
    module = [r for r in rails if r.label == MODULE_RAIL]
    return module or rails


@dataclass(frozen=True)
class EnergyReading:
    """What one measured window used: energy (mJ, ``None`` without rails), duration (s), samples and rails."""

    energy_mj: float | None
    seconds: float
    samples: int
    rails: tuple[str, ...] = ()
    reason: str = ""
    """Why there is no figure, when there is none."""

    def per_inference_mj(self, inferences: int) -> float | None:
        """Millijoules per inference (``None`` without a figure or without inferences)."""
        if self.energy_mj is None or inferences <= 0:
            return None
        return self.energy_mj / inferences


def trapezoid_mj(times_s: list[float], powers_mw: list[float]) -> float:
    """∫ P dt by the trapezoid rule: mW × s = mJ."""
    return float(sum((t1 - t0) * (p0 + p1) / 2.0
                     for t0, t1, p0, p1 in zip(times_s, times_s[1:], powers_mw, powers_mw[1:], strict=False)))


@dataclass
class _Window:
    times: list[float] = field(default_factory=list)
    powers: list[float] = field(default_factory=list)
    errors: int = 0


class PowerSampler:
    """Samples the module's power during a window (:meth:`measure`) and integrates it to energy.

    ``root`` is ``/`` on a device (a recorded tree in tests); ``period_s`` the sampling period; ``rails`` the labels
    to sum (unset: VDD_IN, or every rail where there is no VDD_IN)."""

    def __init__(self, root: Path = Path("/"), *, period_s: float = 0.01, rails: list[str] | None = None) -> None:
        self.root = Path(root)
        self.period_s = max(period_s, 1e-4)
        self.rails = module_rails(find_rails(self.root), rails)
        self.reason = "" if self.rails else (
            f"no INA3221 rail{' ' + ', '.join(rails) if rails else ''} under {self.root / INA3221_DIR} "
            "(not a Jetson, or /sys is not visible)")

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> PowerSampler:
        """The sampler the ``power_*`` settings describe."""
        return cls(settings.power_root, period_s=settings.power_sample_period_ms / 1000,
                   rails=list(settings.power_rails) or None)

    @property
    def available(self) -> bool:
        """Whether there are rails to read."""
        return bool(self.rails)

    def _power_mw(self) -> float:
        return sum(rail.read_mw() for rail in self.rails)

    def _sample(self, window: _Window) -> None:
        try:
            power = self._power_mw()
        except (OSError, ValueError):
            window.errors += 1
            return
        window.times.append(time.perf_counter())
        window.powers.append(power)

    @contextmanager
    def measure(self) -> Iterator[list[EnergyReading]]:
        """``with sampler.measure() as out: ...`` — afterwards ``out[0]`` is the window's :class:`EnergyReading`.

        One sample at the start, one every ``period_s`` from a background thread, one at the end."""
        out: list[EnergyReading] = []
        started = time.perf_counter()
        if not self.rails:
            try:
                yield out
            finally:
                out.append(EnergyReading(None, time.perf_counter() - started, 0, reason=self.reason))
            return
        window, stop = _Window(), threading.Event()
        self._sample(window)

        def run() -> None:
            while not stop.wait(self.period_s):
                self._sample(window)

        thread = threading.Thread(target=run, name="edgeloop-power", daemon=True)
        thread.start()
        try:
            yield out
        finally:
            stop.set()
            thread.join()
            self._sample(window)
            out.append(self._reading(window, time.perf_counter() - started))

    def _reading(self, window: _Window, seconds: float) -> EnergyReading:
        labels = tuple(r.label for r in self.rails)
        if len(window.times) < 2:
            reason = f"fewer than two readable power samples ({window.errors} reads failed)"
            log.warning("no energy figure: %s", reason)
            return EnergyReading(None, seconds, len(window.times), labels, reason)
        return EnergyReading(trapezoid_mj(window.times, window.powers), seconds, len(window.times), labels)


@contextmanager
def measuring(power: PowerSampler | None) -> Iterator[list[EnergyReading]]:
    """:meth:`PowerSampler.measure` of ``power``; with ``None`` (power not measured) a reading without a figure."""
    if power is not None:
        with power.measure() as out:
            yield out
        return
    out: list[EnergyReading] = []
    try:
        yield out
    finally:
        out.append(EnergyReading(None, 0.0, 0, reason="power is not measured here"))


def time_with_energy(call: Callable[[], object], inferences_per_call: int, *, power: PowerSampler | None,
                     runs: int = 50, warmup: int = 3, budget_s: float | None = None) -> tuple[Timing, float | None]:
    """:func:`~edgeloop_core.timing.time_calls` of ``call`` with the module's energy integrated over the timed
    calls only (warm-up runs before the window): ``(timing, mJ per inference)``, the latter ``None`` without rails.
    ``inferences_per_call`` is the batch each call runs (energy per inference is per sample)."""
    for _ in range(warmup):
        call()
    with measuring(power) as out:
        timing = time_calls(call, runs=runs, warmup=0, budget_s=budget_s)
    return timing, out[0].per_inference_mj(timing.runs * inferences_per_call)
