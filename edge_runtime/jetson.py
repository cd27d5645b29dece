"""Jetson GPU, memory, power and thermal figures from ``tegrastats`` (present on every JetPack image).

Where the binary is missing (a workstation, CI) nothing runs and nothing is reported.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}


@dataclass
class TegraSample:
    """One tegrastats line, parsed."""

    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    gpu_utilization_pct: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, int] = field(default_factory=dict)
    """Instantaneous milliwatts per rail (VDD_IN is the whole module on Orin)."""

    def to_dict(self) -> dict[str, Any]:
        return {"ram_used_mb": self.ram_used_mb, "ram_total_mb": self.ram_total_mb,
                "gpu_utilization_pct": self.gpu_utilization_pct, "temperatures_c": self.temperatures_c,
                "power_mw": self.power_mw}


def parse_tegrastats(line: str) -> TegraSample:
    """Parse a line of JetPack 4-6 tegrastats output (both the ``mW/mW`` and the older ``cur/avg`` rails)."""
    sample = TegraSample()
    if match := _RAM.search(line):
        sample.ram_used_mb, sample.ram_total_mb = int(match[1]), int(match[2])
    if match := _GPU.search(line):
        sample.gpu_utilization_pct = int(match[1])
    sample.temperatures_c = {name.lower(): float(value) for name, value in _TEMP.findall(line)}
    sample.power_mw = {name: int(current) for name, current, _ in _RAIL.findall(line) if name not in _NOT_RAILS}
    return sample


class Tegrastats:
    """Runs ``tegrastats --interval <ms>`` and keeps the latest sample."""

    def __init__(self, interval_ms: int = 1000, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("tegrastats")
        self.interval_ms = interval_ms
        self.latest: TegraSample | None = None
        self._process: asyncio.subprocess.Process | None = None

    @property
    def available(self) -> bool:
        """Whether this device has tegrastats."""
        return self.binary is not None

    async def run_forever(self) -> None:
        """Read samples until cancelled."""
        if not self.binary:
            return
        self._process = await asyncio.create_subprocess_exec(
            self.binary, "--interval", str(self.interval_ms), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        assert self._process.stdout is not None
        try:
            while line := await self._process.stdout.readline():
                self.latest = parse_tegrastats(line.decode(errors="replace"))
        finally:
            if self._process.returncode is None:
                self._process.terminate()
