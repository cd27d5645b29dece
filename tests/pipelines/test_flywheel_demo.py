"""`edgeloop demo --flywheel` end to end: a fleet of real runtimes meets typeset digits (a shift from the curated
handwriting), captures and app labels go home to the real SeaweedFS, the scheduled kfp.local run trains on a snapshot
with teacher labels and a warm start, passes the two-slice gate, goes to canary, is validated on the canary device and
promoted by the canary's field signals; the stable devices follow."""

from __future__ import annotations

import re

import pytest

from edgeloop.flywheel_demo import CANARY_DEVICE, STABLE_DEVICES, run_flywheel
from edgeloop_core.contract import load_verify_key
from edgeloop_core.contract.signing import verify_manifest

pytestmark = pytest.mark.integration


def test_one_turn_of_the_flywheel_learns_the_field_and_keeps_the_curated_data(tmp_path):
    result = run_flywheel(tmp_path)

    assert result.promoted, result.promote_reason
    figures = result.figures
    for variant in dict.fromkeys(("fp32-dense", result.variant)):  # the trained model and the variant served
        old, new = figures[f"old/{variant}"], figures[f"new/{variant}"]
        # the acceptance: the field slice rises by at least 10 points, the curated test set drops by at most 0.5
        assert new["field_slice"] - old["field_slice"] >= 0.10, (variant, figures)
        assert new["curated"] >= old["curated"] - 0.005, (variant, figures)
    # live traffic on the stable devices after the rollout, and the drift the hub sees, both improve
    assert figures["new"]["live"] > figures["old"]["live"] + 0.05, figures
    assert figures["new"]["drift"] is not None and figures["new"]["drift"] < figures["old"]["drift"], figures

    manifest = result.manifest
    verify_manifest(manifest, load_verify_key(tmp_path / "keys" / "verify-key.pem"))  # lineage is signed
    lineage = manifest.training["field"]
    assert len(lineage["snapshot"]) == 64
    assert set(lineage["train"]["label_sources"]) <= {"app", "human", "teacher"}
    assert lineage["train"]["label_sources"].get("teacher", 0) > 0  # pseudo-labels helped train ...
    assert set(lineage["slice"]["label_sources"]) <= {"app", "human"}  # ... and never judged
    assert not set(lineage["train"]["devices"]) & set(lineage["slice"]["devices"])
    assert set(lineage["train"]["devices"]) | set(lineage["slice"]["devices"]) <= {*STABLE_DEVICES, CANARY_DEVICE}
    assert manifest.training["warm_start"] == {"version": result.old_version, "checkpoint_sha256":
                                               result.old_manifest.training["checkpoint"]["sha256"]}
    assert manifest.training["config"]["warm_start"] is True
    assert re.search(r"field: \d{3,} new labelled field samples", manifest.training["plan"]["reason"])  # why, signed
    for side in ("train", "slice"):  # the manifest keeps the split's id lists as digests only
        assert "ids" not in lineage[side] and len(lineage[side]["ids_sha256"]) == 64
    assert lineage["slice"]["samples"] > 0 and lineage["ratio"] == 0.2
    assert "checkpoint" in manifest.training and manifest.training["checkpoint"]["key"].endswith("checkpoint.pt")
    assert not any("checkpoint" in f.file for f in manifest.files())  # devices never download it
