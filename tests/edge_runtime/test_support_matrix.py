"""The JetPack support matrix: one device per row of ``edge_runtime.build.jetpack.SUPPORT_MATRIX``, detected from host
files laid out as that device has them (``/etc/nv_tegra_release``, ``/proc/device-tree/model``), and the docs page
rendered from the same table.

The host files' text follows the real formats: ``# R36 (release), REVISION: 4.3, GCID: ...`` and the device-tree
model strings NVIDIA's developer kits report (``NVIDIA Jetson AGX Thor Developer Kit``, ``... Orin NX ...``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from edge_runtime.build.device import detect
from edge_runtime.build.engines.select import plan_for, resolve_backend
from edge_runtime.build.jetpack import SUPPORT_MATRIX, check_jetson_support
from edgeloop_core.contract import TargetKey
from edgeloop_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"orin-nx": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00",
          "agx-orin": "NVIDIA Jetson AGX Orin Developer Kit\x00",
          "orin-nano": "NVIDIA Jetson Orin Nano Developer Kit\x00",
          "agx-thor": "NVIDIA Jetson AGX Thor Developer Kit\x00"}
GPU = {"orin-nx": ("87", 8), "agx-orin": ("87", 16), "orin-nano": ("87", 8), "agx-thor": ("110", 20)}


def jetson(tmp_path: Path, *, l4t: str, trt: str, module: str):
    """Device facts of a Jetson with this L4T release (``"38.2"``), TensorRT build and module, detected from files."""
    major, revision = l4t.split(".", 1)
    (tmp_path / "nv_tegra_release").write_text(
        f"# R{major} (release), REVISION: {revision}, GCID: 41062509, BOARD: generic, EABI: aarch64, DATE: ...\n")
    (tmp_path / "model").write_text(MODELS[module])
    facts = detect(tmp_path / "nv_tegra_release", tmp_path / "model")
    cc, sms = GPU[module]
    return replace(facts, arch="aarch64", trt_version=trt, compute_capability=cc, sm_count=sms, trt_error=None)


# (JetPack, L4T, TensorRT build, module, refused because ... or None when supported)
DEVICES = [
    ("5.1", "35.4", "8.5.2.2", "orin-nx", "JetPack 5 ships TensorRT 8.5"),
    ("6.0", "36.3", "8.6.2.3", "orin-nx", "JetPack 6.0 ships TensorRT 8.6"),
    ("6.1", "36.4", "10.3.0.30", "orin-nx", None),
    ("6.2", "36.4", "10.3.0.30", "orin-nano", None),
    ("7.0", "38.2", "10.13.3.9", "agx-thor", None),  # Thor (sm_110) with the TensorRT 10.x JetPack 7.0 ships
    ("7.1", "38.4", "10.13.3.9", "agx-thor", None),
    ("7.2", "39.0", "10.13.3.9", "orin-nx", None),  # an Orin on JetPack 7 with TensorRT 10.x
    ("7.2.2", "39.2", "11.4.1.2", "agx-orin", None),
    ("7.2.2", "39.2", "11.4.1.2", "agx-thor", None),
    ("7.2.2", "39.2", "11.4.1.2", "orin-nx", "only on agx-orin"),  # NVIDIA: AGX Orin and Thor only
    ("7.1", "38.4", "11.2.1.1", "agx-thor", "11.0 to 11.4.0 do not support JetPack"),
]


@pytest.mark.parametrize(("jetpack", "l4t", "trt", "module", "refused"), DEVICES,
                         ids=[f"jp{d[0]}-{d[3]}-trt{d[2]}" for d in DEVICES])
def test_each_row_of_the_support_matrix(tmp_path, jetpack, l4t, trt, module, refused):
    facts = jetson(tmp_path, l4t=l4t, trt=trt, module=module)
    assert facts.is_jetson and facts.module == module and facts.l4t_release == l4t
    if refused is None:
        assert resolve_backend(facts) == ("tensorrt", "cpu")
        row = check_jetson_support(facts)
        assert row is not None and row.supported and jetpack in row.jetpack.replace("+", "").split(" / ")
        return
    with pytest.raises(ConfigError) as info:
        resolve_backend(facts)
    message = str(info.value)
    assert refused in message and "EDGE_BACKEND=onnxruntime" in message and "\n" not in message


def test_every_row_is_exercised():
    """Each row of the table is the verdict of at least one device above (a new row needs its device)."""
    from edge_runtime.build.jetpack import parse_version, support_row

    hit = {support_row(l4t, trt, module) for _, l4t, trt, module, _ in DEVICES}
    assert hit - {None} == set(SUPPORT_MATRIX), [r.jetpack for r in set(SUPPORT_MATRIX) - hit]
    assert parse_version("10.13.3.9+cuda13.0") == (10, 13, 3, 9)


def test_a_thor_target_key_is_sm110_and_round_trips(tmp_path):
    from tests.conftest import make_staged_version

    manifest = make_staged_version(tmp_path / "m")
    facts = jetson(tmp_path, l4t="38.2", trt="10.13.3.9", module="agx-thor")
    key = plan_for(manifest, facts, manifest.variant("fp32"), backend="tensorrt", device="cpu").target_key
    assert str(key) == "trt10.13.3.9-sm110x20-agx-thor-l4t38.2-aarch64-fp32-b1x8x16"
    assert TargetKey.parse(str(key)) == key


def test_a_tensorrt_that_does_not_go_with_the_l4t_release_says_what_it_runs(tmp_path):
    facts = jetson(tmp_path, l4t="36.4", trt="11.4.1.2", module="agx-orin")  # TensorRT 11 on JetPack 6
    with pytest.raises(ConfigError) as info:
        check_jetson_support(facts)
    assert "JetPack 6.1 / 6.2, which runs TensorRT 10.3" in str(info.value)
    old = jetson(tmp_path, l4t="36.3", trt="10.3.0.30", module="orin-nx")  # 10.3 on JetPack 6.0's L4T
    with pytest.raises(ConfigError) as info:
        check_jetson_support(old)
    assert "JetPack 6.0" in str(info.value) and "8.6" in str(info.value)
    unknown = jetson(tmp_path, l4t="37.1", trt="10.3.0.30", module="orin-nx")
    with pytest.raises(ConfigError) as info:
        check_jetson_support(unknown)
    assert "not in the JetPack support matrix" in str(info.value)


def test_the_fleet_page_shows_the_table_the_runtime_decides_by():
    spec = importlib.util.spec_from_file_location("generate_support_matrix",
                                                  ROOT / "scripts" / "generate_support_matrix.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    page = generator.PAGE.read_text()
    assert page == generator.render_page(page), \
        "docs/fleet.md is stale: run .venv/bin/python scripts/generate_support_matrix.py"
    for row in SUPPORT_MATRIX:
        assert f"| {row.jetpack} | {row.l4t} | {row.trt} |" in page
