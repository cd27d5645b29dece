"""Generated protobuf code is reproducible: regenerating from protos/ gives exactly the committed files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_proto_sources(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "scripts" / "generate_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.generate(tmp_path)
    assert fresh, "nothing generated"
    for path in fresh:
        committed = ROOT / "edgeloop_core" / "protos" / path.name
        assert committed.exists(), f"{path.name} is not committed: run `make protos`"
        assert committed.read_text() == path.read_text(), f"{path.name} is stale: run `make protos`"
