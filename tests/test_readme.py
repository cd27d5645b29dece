"""The README stays true: its first commands, and every setting documented."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.settings import EdgeSettings
from telemetry_hub.server import HubSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quickstart_is_the_two_make_commands():
    block = README.split("```sh", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_every_setting_is_documented():
    for cls, prefix in ((EdgeSettings, "EDGE_"), (HubSettings, "HUB_")):
        missing = [f"{prefix}{name.upper()}" for name in cls.model_fields if f"{prefix}{name.upper()}" not in README]
        assert not missing, f"README lacks {missing}"
