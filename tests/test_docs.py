"""The README and the docs site stay true: the README's first commands, its size and its links; the generated
configuration reference against the settings classes and the charts; and ``mkdocs build --strict`` (a broken link,
a missing anchor, a page outside the nav or a missing snippet fails)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from edge_runtime.settings import EdgeSettings, ModelEntry
from telemetry_hub.server import HubSettings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGE = ROOT / "docs" / "configuration.md"
HELM = os.environ.get("EDGELOOP_HELM", str(ROOT / ".tools" / "bin" / "helm"))
CHARTS = {"edge-runtime": (EdgeSettings, "EDGE_"), "telemetry-hub": (HubSettings, "HUB_")}


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    """``scripts/generate_config_reference.py``, loaded as a module."""
    spec = importlib.util.spec_from_file_location("generate_config_reference",
                                                  ROOT / "scripts" / "generate_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_quickstart_is_the_two_make_commands():
    block = README.read_text().split("```sh", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_readme_is_at_most_150_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= 150, f"README.md has {lines} lines: move the detail into docs/"


def test_readme_links_point_to_files_that_exist():
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert local, "the README links to no docs page"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_configuration_page_is_the_fresh_render(generator):
    assert PAGE.exists(), "docs/configuration.md is missing: run scripts/generate_config_reference.py"
    assert PAGE.read_text() == generator.render(), \
        "docs/configuration.md is stale: run .venv/bin/python scripts/generate_config_reference.py"


def test_every_setting_has_a_row_in_the_configuration_page():
    page = PAGE.read_text()
    rows = set(re.findall(r"^\| `([A-Za-z0-9_]+)` \|", page, flags=re.M))
    wanted = {f"{prefix}{name.upper()}" for settings, prefix in CHARTS.values() for name in settings.model_fields}
    wanted |= set(ModelEntry.model_fields)
    assert not wanted - rows, f"docs/configuration.md lacks {sorted(wanted - rows)}"
    assert not rows - wanted, f"docs/configuration.md documents settings that do not exist: {sorted(rows - wanted)}"


def test_the_chart_values_the_page_names_exist(generator):
    for chart, workload in (("edge-runtime", "daemonset.yaml"), ("telemetry-hub", "deployment.yaml")):
        values = yaml.safe_load((ROOT / "helm" / chart / "values.yaml").read_text())
        read = generator.read_chart(ROOT / "helm" / chart, workload)
        named = [ref for refs in read.named.values() for ref in refs]
        named += [*read.desired.values(), *(key.split("[]", 1)[0] for key in read.entry_keys.values())]
        assert named, f"nothing read from helm/{chart}"
        for ref in named:
            node = values
            for part in ref.split("."):
                assert isinstance(node, dict) and part in node, f"helm/{chart}: no value {ref} in values.yaml"
                node = node[part]


def rendered(chart: str) -> list[dict]:
    """Every object the chart renders, over all its install scenarios (``ci/*-values.yaml``), by the real helm."""
    assert Path(HELM).exists() or shutil.which(HELM), f"helm not found at {HELM}: `make test` installs it"
    docs: list[dict] = []
    for values in sorted((ROOT / "helm" / chart / "ci").glob("*-values.yaml")):
        result = subprocess.run([HELM, "template", "docs", str(ROOT / "helm" / chart), "-f", str(values)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        docs += [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return docs


def rendered_env(chart: str) -> set[str]:
    """Every environment variable name the chart's containers get."""
    names: set[str] = set()
    for doc in rendered(chart):
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            names |= {env["name"] for env in container.get("env", [])}
    return names


@pytest.mark.parametrize("chart", sorted(CHARTS))
def test_every_variable_a_chart_sets_is_a_setting_with_its_chart_value_in_the_page(chart):
    settings, prefix = CHARTS[chart]
    env = {name for name in rendered_env(chart) if name.startswith(prefix)}
    assert env, f"helm/{chart} renders no {prefix}* variable"
    unknown = sorted(name for name in env if name.removeprefix(prefix).lower() not in settings.model_fields)
    assert not unknown, f"helm/{chart} sets variables no setting reads (silently ignored): {unknown}"
    page = PAGE.read_text()
    undocumented = [name for name in env if not re.search(rf"^\| `{name}` \| (?!—)", page, flags=re.M)]
    assert not undocumented, f"docs/configuration.md names no chart value for {sorted(undocumented)}"


def test_mkdocs_build_strict_passes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site"), "-f",
         str(ROOT / "mkdocs.yml")],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def test_every_key_of_the_desired_file_the_chart_writes_has_its_chart_value_in_the_page(generator):
    keys: set[str] = set()
    entry_keys: set[str] = set()
    for doc in rendered("edge-runtime"):
        if doc["kind"] == "ConfigMap" and "desired.json" in doc.get("data", {}):
            desired = json.loads(doc["data"]["desired.json"])
            keys |= set(desired)
            entry_keys |= {key for entry in desired.get("models", []) for key in entry}
    assert {"model_name", "models"} <= keys and "max_batch_size" in entry_keys, "the scenarios cover both forms"
    read = generator.read_chart(ROOT / "helm" / "edge-runtime", "daemonset.yaml")
    unread = sorted(keys - set(read.desired)) + sorted(entry_keys - set(read.entry_keys))
    assert not unread, f"the generator found no chart value for the desired file's keys {unread}"
    assert keys <= set(EdgeSettings.model_fields) and entry_keys <= set(ModelEntry.model_fields)


def test_no_page_promises_cuda_shared_memory_on_jetson():
    """Triton's Jetson guide: CUDA IPC is not supported on JetPack (system shared memory is). Every sentence of the
    README and the docs that offers CUDA shared memory says where it does not hold."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = " ".join(page.read_text(encoding="utf-8").split())
        for sentence in re.split(r"(?<=[.;:])\s", text):
            if "CUDA shared memory" in sentence:
                window = text[text.index(sentence):text.index(sentence) + len(sentence) + 200]
                caveat = re.search(r"not[^.]{0,40}Jetson|Jetson[^.]{0,80}not supported", window)
                assert caveat, f"{page.name}: CUDA shared memory offered without its Jetson caveat: {sentence[:160]}"
