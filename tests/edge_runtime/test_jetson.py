"""Jetson figures from sysfs and procfs, on a file tree laid out as an Orin's (the real reader, a fake root)."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.report.jetson import JetsonSensors
from edge_runtime.report.metrics import RuntimeMetrics


def _orin_tree(root: Path) -> Path:
    gpu = root / "sys/class/devfreq/17000000.ga10b"
    (gpu / "device").mkdir(parents=True)
    (gpu / "device/load").write_text("372\n")
    (gpu / "cur_freq").write_text("305000000\n")
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text("MemTotal:        7802780 kB\nMemFree:  100 kB\nMemAvailable:    5019616 kB\n")
    for i, (name, milli) in enumerate((("cpu-thermal", 46156), ("gpu-thermal", 45250))):
        zone = root / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(name + "\n")
        (zone / "temp").write_text(f"{milli}\n")
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hwmon.mkdir(parents=True)
    for channel, (label, mv, ma) in enumerate((("VDD_IN", 5008, 926), ("VDD_CPU_GPU_CV", 4992, 97)), start=1):
        (hwmon / f"in{channel}_label").write_text(label + "\n")
        (hwmon / f"in{channel}_input").write_text(f"{mv}\n")
        (hwmon / f"curr{channel}_input").write_text(f"{ma}\n")
    return root


def test_an_orin_tree_gives_every_figure(tmp_path):
    sample = JetsonSensors(_orin_tree(tmp_path)).sample()
    assert sample.gpu_utilization_pct == 37.2 and sample.gpu_freq_mhz == 305.0
    assert (sample.ram_total_mb, sample.ram_used_mb) == (7802780 // 1024, 7802780 // 1024 - 5019616 // 1024)
    assert sample.temperatures_c == {"cpu-thermal": 46.156, "gpu-thermal": 45.25}
    assert sample.power_mw == {"VDD_IN": 5008 * 926 // 1000, "VDD_CPU_GPU_CV": 4992 * 97 // 1000}
    assert sample.unavailable == {}


def test_missing_figures_are_said_not_dropped(tmp_path):
    root = _orin_tree(tmp_path)
    (root / "sys/class/devfreq/17000000.ga10b/device/load").unlink()  # e.g. a kernel without the load node
    for path in (root / "sys/bus/i2c/drivers/ina3221").rglob("*_input"):
        path.unlink()
    sample = JetsonSensors(root).sample()
    assert sample.gpu_utilization_pct is None and "device/load" in sample.unavailable["gpu_utilization"]
    assert sample.gpu_freq_mhz == 305.0 and "INA3221" in sample.unavailable["power"]
    metrics = RuntimeMetrics()
    metrics.observe_jetson(sample)
    exposed = {(s.labels.get("figure"), s.value) for m in metrics.registry.collect()
               if m.name == "edgeloop_jetson_figure_available" for s in m.samples}
    assert ("gpu_utilization", 0.0) in exposed and ("gpu_frequency", 1.0) in exposed and ("power", 0.0) in exposed


def test_nothing_there_is_reported_as_such(tmp_path):
    sample = JetsonSensors(tmp_path).sample()
    assert set(sample.unavailable) == {"gpu_utilization", "gpu_frequency", "ram", "temperatures", "power"}


def test_scratch_folders_the_chart_points_into_the_cache_volume_are_created_before_cuda_starts(tmp_path, monkeypatch):
    """TMPDIR must exist (else CUDA, TensorRT and Python fall back to the small /tmp emptyDir); detect() creates it
    and CUDA_CACHE_PATH first, and says so, without failing, where it cannot."""
    from edge_runtime.build.device import detect, prepare_scratch

    cache = tmp_path / "cache"
    monkeypatch.setenv("TMPDIR", str(cache / "scratch" / "tmp"))
    monkeypatch.setenv("CUDA_CACHE_PATH", str(cache / "scratch" / "cuda"))
    facts = detect(tmp_path / "no-tegra", tmp_path / "no-model")
    assert (cache / "scratch" / "tmp").is_dir() and (cache / "scratch" / "cuda").is_dir()
    assert not any("cannot be created" in n for n in facts.notes)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    notes = prepare_scratch({"TMPDIR": str(blocked / "tmp")})
    assert len(notes) == 1 and notes[0].startswith(f"TMPDIR={blocked / 'tmp'} cannot be created")
