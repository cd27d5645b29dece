"""Jetson GPU, memory, power and thermal figures, read from sysfs and procfs (no ``tegrastats``: that is a host tool,
absent from the container).

* GPU load and frequency: ``/sys/class/devfreq/<gpu>/device/load`` (per mille) and ``cur_freq`` (Hz), where the
  devfreq device is the GPU (``*gpu*``, ``*ga10b*`` on Orin, ``*gv11b*`` on Xavier);
* RAM: ``/proc/meminfo`` (the CPU and the GPU share it on a Jetson);
* temperatures: ``/sys/class/thermal/thermal_zone*/{type,temp}`` (millidegrees);
* power: the INA3221 monitors under ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/`` (``inN_label``,
  ``inN_input`` mV, ``currN_input`` mA).

A figure that cannot be read is not silently left out: :attr:`JetsonSample.unavailable` says which and why, and
the metrics and telemetry carry that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GPU_DEVFREQ_NAMES = ("gpu", "ga10b", "gv11b", "gp10b")


@dataclass
class JetsonSample:
    """The figures read at one moment, and those that could not be read (figure → reason)."""

    gpu_utilization_pct: float | None = None
    gpu_freq_mhz: float | None = None
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, int] = field(default_factory=dict)
    """Milliwatts per rail (VDD_IN is the whole module on Orin)."""
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (telemetry)."""
        return {"gpu_utilization_pct": self.gpu_utilization_pct, "gpu_freq_mhz": self.gpu_freq_mhz,
                "ram_used_mb": self.ram_used_mb, "ram_total_mb": self.ram_total_mb,
                "temperatures_c": self.temperatures_c, "power_mw": self.power_mw, "unavailable": self.unavailable}


def _read(path: Path) -> str:
    return path.read_text().strip()


class JetsonSensors:
    """Reads a :class:`JetsonSample` from the files under ``root`` (``/`` on a device; a folder in tests)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)

    def _gpu_devfreq(self) -> Path | None:
        base = self.root / "sys/class/devfreq"
        for entry in sorted(base.glob("*")) if base.exists() else []:
            name = entry.name.lower()
            of_name = entry / "device/of_node/name"
            node = _read(of_name).lower() if of_name.exists() else ""
            if any(n in name for n in GPU_DEVFREQ_NAMES) or node.startswith("gpu"):
                return entry
        return None

    def sample(self) -> JetsonSample:
        """Everything readable now; the rest in ``unavailable`` with the reason."""
        sample = JetsonSample()
        gpu = self._gpu_devfreq()
        if gpu is None:
            reason = "no GPU devfreq device under /sys/class/devfreq (not a Jetson, or /sys is not visible)"
            sample.unavailable.update(gpu_utilization=reason, gpu_frequency=reason)
        else:
            for figure, path, convert in (("gpu_utilization", gpu / "device/load", lambda v: int(v) / 10.0),
                                          ("gpu_frequency", gpu / "cur_freq", lambda v: int(v) / 1e6)):
                try:
                    value = convert(_read(path))
                except (OSError, ValueError) as exc:
                    sample.unavailable[figure] = f"cannot read {path.relative_to(self.root)}: {exc}"
                    continue
                if figure == "gpu_utilization":
                    sample.gpu_utilization_pct = value
                else:
                    sample.gpu_freq_mhz = value
        try:
            info = dict(line.split(":", 1) for line in _read(self.root / "proc/meminfo").splitlines() if ":" in line)
            total = int(info["MemTotal"].split()[0]) // 1024
            sample.ram_total_mb, sample.ram_used_mb = total, total - int(info["MemAvailable"].split()[0]) // 1024
        except (OSError, KeyError, ValueError) as exc:
            sample.unavailable["ram"] = f"cannot read /proc/meminfo: {exc}"
        for zone in sorted((self.root / "sys/class/thermal").glob("thermal_zone*")):
            try:
                sample.temperatures_c[_read(zone / "type").lower()] = int(_read(zone / "temp")) / 1000.0
            except (OSError, ValueError):
                continue
        if not sample.temperatures_c:
            sample.unavailable["temperatures"] = "no readable /sys/class/thermal/thermal_zone*"
        for hwmon in sorted((self.root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):
            for label in sorted(hwmon.glob("in*_label")):
                channel = label.name[2:].split("_")[0]
                try:
                    millivolts = int(_read(hwmon / f"in{channel}_input"))
                    milliamps = int(_read(hwmon / f"curr{channel}_input"))
                except (OSError, ValueError):
                    continue
                sample.power_mw[_read(label)] = millivolts * milliamps // 1000
        if not sample.power_mw:
            sample.unavailable["power"] = "no INA3221 power monitor under /sys/bus/i2c/drivers/ina3221"
        return sample
