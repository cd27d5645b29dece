"""Energy per inference from the INA3221 power monitors, read from a recorded Jetson Orin NX sysfs tree.

The tree (tests/data/sysfs-orin-nx, see its SOURCE.md) has the paths and labels the Orin NX/Nano module really has:
NVIDIA's Tegra234 device tree for p3767 (upstream Linux, "arm64: tegra: Add power-sensors for Tegra234 boards")
puts an INA3221 at 0x40 on I2C bus 1 with inputs VDD_IN, VDD_CPU_GPU_CV and VDD_SOC, and the ina3221 hwmon ABI
(Linux Documentation/hwmon/ina3221.rst) gives in<N>_label, in<N>_input (mV) and curr<N>_input (mA). The AGX Orin
tree below follows the same commit's p3701 entries (VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0; VDDQ_VDD2_1V8AO at 0x41).
The sampler is the real one; the test scripts the draw by rewriting the current file, as the kernel would.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.build.power import PowerSampler, find_rails, measuring, time_with_energy, trapezoid_mj

ORIN_NX = Path(__file__).resolve().parents[1] / "data" / "sysfs-orin-nx"
HWMON = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"


@pytest.fixture
def orin(tmp_path) -> Path:
    root = tmp_path / "orin"
    shutil.copytree(ORIN_NX, root)
    return root


def test_the_recorded_orin_nx_tree_has_its_three_rails_and_vdd_in_is_the_module():
    rails = find_rails(ORIN_NX)
    assert [r.label for r in rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    sampler = PowerSampler(ORIN_NX)
    assert sampler.available and [r.label for r in sampler.rails] == ["VDD_IN"]
    assert sampler.rails[0].read_mw() == pytest.approx(5008 * 926 / 1000)
    chosen = PowerSampler(ORIN_NX, rails=["VDD_CPU_GPU_CV", "VDD_SOC"])
    assert [r.label for r in chosen.rails] == ["VDD_CPU_GPU_CV", "VDD_SOC"]
    assert not PowerSampler(ORIN_NX, rails=["VDD_GPU_SOC"]).available  # a rail this module lacks: no figure


def test_an_agx_orin_without_vdd_in_sums_its_rails(tmp_path):
    for address, rails in (("1-0040", (("VDD_GPU_SOC", 4984, 1200), ("VDD_CPU_CV", 4984, 800),
                                       ("VIN_SYS_5V0", 4976, 900))),
                           ("1-0041", ((None, 0, 0), ("VDDQ_VDD2_1V8AO", 4992, 200), (None, 0, 0)))):
        hwmon = tmp_path / f"sys/bus/i2c/drivers/ina3221/{address}/hwmon/hwmon{address[-1]}"
        hwmon.mkdir(parents=True)
        for channel, (label, mv, ma) in enumerate(rails, start=1):
            if label is None:  # status = "disabled" in the device tree: the driver exposes no label
                continue
            (hwmon / f"in{channel}_label").write_text(label + "\n")
            (hwmon / f"in{channel}_input").write_text(f"{mv}\n")
            (hwmon / f"curr{channel}_input").write_text(f"{ma}\n")
    sampler = PowerSampler(tmp_path)
    assert {r.label for r in sampler.rails} == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert sum(r.read_mw() for r in sampler.rails) == pytest.approx(
        (4984 * 1200 + 4984 * 800 + 4976 * 900 + 4992 * 200) / 1000)


def test_energy_is_the_integral_of_what_the_rail_draws(orin):
    current = orin / HWMON / "curr1_input"
    sampler = PowerSampler(orin, period_s=0.005)
    current.write_text("1000\n")  # 5008 mV x 1000 mA = 5008 mW
    with sampler.measure() as out:
        time.sleep(0.2)
    (steady,) = out
    assert steady.samples >= 10 and steady.rails == ("VDD_IN",)
    assert steady.energy_mj == pytest.approx(5008 * steady.seconds, rel=0.05)

    def step_up() -> None:  # the draw triples halfway through the window
        time.sleep(0.15)
        current.write_text("3000\n")

    current.write_text("1000\n")
    thread = threading.Thread(target=step_up)
    with sampler.measure() as out:
        thread.start()
        time.sleep(0.3)
    thread.join()
    (stepped,) = out
    low, high = 5008 * 0.15, 3 * 5008 * (stepped.seconds - 0.15)
    assert stepped.energy_mj == pytest.approx(low + high, rel=0.12)
    assert stepped.per_inference_mj(100) == pytest.approx(stepped.energy_mj / 100)


def test_no_rails_is_no_figure_never_zero(tmp_path):
    sampler = PowerSampler(tmp_path)
    assert not sampler.available and "no INA3221 rail" in sampler.reason
    with sampler.measure() as out:
        pass
    assert out[0].energy_mj is None and out[0].per_inference_mj(10) is None and out[0].reason
    with measuring(None) as out:
        pass
    assert out[0].energy_mj is None
    timing, mj = time_with_energy(lambda: None, 1, power=sampler, runs=5, warmup=0)
    assert timing.runs == 5 and mj is None


def test_an_unreadable_rail_gives_no_figure_rather_than_a_wrong_one(orin):
    sampler = PowerSampler(orin)
    (orin / HWMON / "curr1_input").unlink()  # the driver went away after start-up
    with sampler.measure() as out:
        time.sleep(0.03)
    assert out[0].energy_mj is None and "fewer than two" in out[0].reason


def test_trapezoid():
    assert trapezoid_mj([0.0, 1.0, 3.0], [1000.0, 3000.0, 3000.0]) == pytest.approx(2000 + 6000)
    assert trapezoid_mj([0.0], [5.0]) == 0.0


def test_prometheus_shows_the_serving_variants_mj_per_inference_and_nothing_without_it():
    from prometheus_client import generate_latest

    from edge_runtime.report.metrics import RuntimeMetrics

    metrics = RuntimeMetrics()
    metrics.set_energy("digits-cnn", "int8-qdq", 0.0421)
    text = generate_latest(metrics.registry).decode()
    assert 'edgeloop_energy_millijoules_per_inference{model="digits-cnn",variant="int8-qdq"} 0.0421' in text
    metrics.set_energy("digits-cnn", "fp16", 0.05)  # another variant serves: one series, the new one
    text = generate_latest(metrics.registry).decode()
    assert 'variant="int8-qdq"' not in text and 'variant="fp16"} 0.05' in text
    metrics.set_energy("digits-cnn", "fp16", None)  # no rails: absent, not 0
    assert "edgeloop_energy_millijoules_per_inference{" not in generate_latest(metrics.registry).decode()


def test_the_power_settings_choose_root_rails_and_period(monkeypatch):
    from edge_runtime.settings import EdgeSettings

    monkeypatch.setenv("EDGE_POWER_ROOT", str(ORIN_NX))
    monkeypatch.setenv("EDGE_POWER_RAILS", "VDD_CPU_GPU_CV, VDD_SOC")
    monkeypatch.setenv("EDGE_POWER_SAMPLE_PERIOD_MS", "2.5")
    sampler = PowerSampler.from_settings(EdgeSettings())
    assert [r.label for r in sampler.rails] == ["VDD_CPU_GPU_CV", "VDD_SOC"] and sampler.period_s == 0.0025
    monkeypatch.delenv("EDGE_POWER_RAILS")
    assert [r.label for r in PowerSampler.from_settings(EdgeSettings()).rails] == ["VDD_IN"]
