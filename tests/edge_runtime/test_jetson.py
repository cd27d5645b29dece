"""tegrastats lines as JetPack 6 (Orin) and JetPack 4 (Xavier) print them."""

from __future__ import annotations

import asyncio
import shutil
import stat

from edge_runtime.jetson import Tegrastats, parse_tegrastats

ORIN = ("11-24-2026 20:40:01 RAM 2718/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@729,1%@729,off,off] "
        "EMC_FREQ 0%@2133 GR3D_FREQ 37%@[305] NVENC off VIC off APE 200 cpu@46.156C soc2@45.031C gpu@45.25C "
        "tj@46.156C VDD_IN 4638mW/4638mW VDD_CPU_GPU_CV 483mW/483mW VDD_SOC 1450mW/1450mW")
XAVIER = ("RAM 2033/7765MB (lfb 1x4MB) SWAP 0/3883MB (cached 0MB) CPU [1%@1190,0%@1190] EMC_FREQ 0% GR3D_FREQ 0% "
          "AO@37C GPU@37.5C Tdiode@39.75C CPU@38.5C GPU 0/0 CPU 153/153 SOC 1227/1227 CV 0/0 SYS5V 1925/1925")


def test_orin_line():
    sample = parse_tegrastats(ORIN)
    assert (sample.ram_used_mb, sample.ram_total_mb, sample.gpu_utilization_pct) == (2718, 7620, 37)
    assert sample.temperatures_c["gpu"] == 45.25 and sample.temperatures_c["tj"] == 46.156
    assert sample.power_mw == {"VDD_IN": 4638, "VDD_CPU_GPU_CV": 483, "VDD_SOC": 1450}


def test_xavier_line():
    sample = parse_tegrastats(XAVIER)
    assert sample.gpu_utilization_pct == 0 and sample.temperatures_c["tdiode"] == 39.75
    assert sample.power_mw == {"GPU": 0, "CPU": 153, "SOC": 1227, "CV": 0, "SYS5V": 1925}


def test_reader_runs_the_binary_and_keeps_the_latest_sample(tmp_path):
    fake = tmp_path / "tegrastats"  # a stand-in executable printing what the real one prints
    fake.write_text(f"#!/bin/sh\necho '{XAVIER}'\necho '{ORIN}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    reader = Tegrastats(binary=str(fake))
    asyncio.run(reader.run_forever())
    assert reader.latest is not None and reader.latest.power_mw["VDD_IN"] == 4638
    assert Tegrastats().available == (shutil.which("tegrastats") is not None)
