"""The retraining pipeline through kfp.local (SubprocessRunner) against the real SeaweedFS S3 server."""

from __future__ import annotations

import json

import pytest

from edgeloop_core.contract import ArtifactLayout, sha256_bytes
from edgeloop_core.errors import PipelineFailed
from edgeloop_core.published import verify_published
from pipelines.local_run import run_local

pytestmark = pytest.mark.integration

MODEL = "digits-cnn"
QUICK = {"epochs": 3, "prune_finetune_epochs": 1, "qat_epochs": 1, "tolerance_points": 100.0}
"""Short schedules for runs that test the plumbing, not accuracy (hence the wide gate)."""


@pytest.fixture(scope="module")
def pipeline_env(local_s3, key_dir, tmp_path_factory):
    """Environment for components (S3 credentials and endpoint, signing key) and one bucket for this module."""
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    store = local_s3.store("pipeline-tests")
    yield store, tmp_path_factory.mktemp("runs")
    mp.undo()


@pytest.fixture(scope="module")
def default_run(pipeline_env, local_s3):
    """One run with the default parameters: the numbers the README promises come from it."""
    store, runs = pipeline_env
    result = run_local({"model_name": MODEL, "bucket": store.bucket, "s3_endpoint": local_s3.endpoint_url},
                       runs_dir=runs)
    return result


def test_default_run_publishes_a_complete_signed_version(default_run, pipeline_env, verify_key, tmp_path):
    store, _ = pipeline_env
    layout = ArtifactLayout()
    assert default_run.decision == "train" and default_run.version
    manifest = verify_published(store, layout, MODEL, default_run.version, verify_key, workdir=tmp_path)
    for ref in manifest.files():  # every sha256 matches the bytes in the bucket, independently of verify_published
        assert sha256_bytes(store.get_bytes(layout.file_key(MODEL, manifest.version, ref.file))) == ref.sha256
    assert {v.name for v in manifest.variants} == {"fp32-dense", "fp32", "fp16", "int8-qdq", "int8-ort"}
    assert manifest.inputs[0].shape == [-1, 1, 8, 8] and manifest.outputs[0].shape == [-1, 10]
    assert manifest.validation.num_samples == 360 and manifest.validation.tolerance == pytest.approx(0.01)
    assert manifest.training["config"]["arch"] == "cnn" and len(manifest.training["fingerprint"]) == 64
    assert manifest.training["plan"] == {"decision": "train", "reason": "no version on channel 'stable' of "
                                                                        "'digits-cnn' yet"}
    assert "field" not in manifest.training and "warm_start" not in manifest.training  # no field data, cold start
    checkpoint = manifest.training["checkpoint"]  # cloud-only: signed in the manifest, not among its files
    assert checkpoint["key"] == layout.file_key(MODEL, manifest.version, "training/checkpoint.pt")
    assert sha256_bytes(store.get_bytes(checkpoint["key"])) == checkpoint["sha256"]
    assert "training/checkpoint.pt" not in {ref.file for ref in manifest.files()}
    pointer = json.loads(store.get_bytes(layout.channel_key(MODEL, "stable")))
    assert pointer["version"] == manifest.version
    report = store.get_bytes(layout.file_key(MODEL, manifest.version, "report.html")).decode()
    assert report.count("data:image/png;base64,") == 3
    assert "stratified by class" in report and "÷ fp32 b16" in report
    evaluation = default_run.evaluation()
    for variant in manifest.variants:  # the manifest carries the evaluation's speed figures and preference
        assert variant.speedup == evaluation.variant(variant.name).speedup
        assert variant.preferred == evaluation.variant(variant.name).preferred
    # the drift baseline: the training digits through the dense model, every digit predicted, confidence mostly high
    baseline = manifest.field_baseline
    assert baseline is not None and baseline.samples == 1167  # every training digit (under the 2,000 cap)
    assert set(baseline.features) == {"input:input:c0:mean", "input:input:c0:std", "class", "confidence"}
    assert len(baseline.features["class"].proportions) == 10 and min(baseline.features["class"].proportions) > 0.05
    assert sum(baseline.features["confidence"].proportions[-3:]) > 0.8


def test_default_model_meets_the_accuracy_and_pruning_targets(default_run):
    evaluation = default_run.evaluation()
    dense, pruned, qat = (evaluation.variant(n) for n in ("fp32-dense", "fp32", "int8-qdq"))
    assert dense.accuracy >= 0.95
    assert qat.drop_points <= 1.0
    assert pruned.flops <= 0.7 * dense.flops  # at least 30% fewer FLOPs
    assert pruned.drop_points <= 1.0
    assert evaluation.variant("int8-ort").drop_points <= 1.0
    for v in evaluation.variants:
        assert v.params > 0 and v.size_bytes > 0 and v.latency_ms_b1 > 0 and v.latency_ms_b16 > 0
        assert set(v.speedup) == {"b1_vs_fp32-dense", "b16_vs_fp32-dense", "b1_vs_fp32", "b16_vs_fp32"}
        assert v.preferred or v.note.startswith("not preferred")
    # the INT8 calibration saw every digit, in proportion
    assert evaluation.calibration["samples"] == 512
    assert len(evaluation.calibration["histogram"]) == 10 and min(evaluation.calibration["histogram"].values()) > 0


def test_unchanged_data_and_config_skip_training(default_run, pipeline_env, local_s3):
    store, runs = pipeline_env
    result = run_local({"model_name": MODEL, "bucket": store.bucket, "s3_endpoint": local_s3.endpoint_url},
                       runs_dir=runs)
    assert result.decision == "skip" and result.version is None
    assert result.reason == f"same data and config as the deployed {default_run.version}: nothing to learn"
    versions = [v for v in store.list_prefixes(f"models/{MODEL}/") if v != "channels"]
    assert versions == [default_run.version]


def test_second_run_publishes_a_new_version_without_touching_the_first(default_run, pipeline_env, local_s3,
                                                                       verify_key):
    store, runs = pipeline_env
    layout = ArtifactLayout()
    first_prefix = layout.version_prefix(MODEL, default_run.version)
    before = {k: store.get_bytes(k) for k in store.list_keys(first_prefix)}
    result = run_local({"model_name": MODEL, "bucket": store.bucket, "s3_endpoint": local_s3.endpoint_url,
                        "force_retrain": True, **QUICK}, runs_dir=runs)
    assert result.version and result.version != default_run.version
    assert {k: store.get_bytes(k) for k in store.list_keys(first_prefix)} == before
    verify_published(store, layout, MODEL, result.version, verify_key)
    verify_published(store, layout, MODEL, default_run.version, verify_key)
    assert json.loads(store.get_bytes(layout.channel_key(MODEL, "stable")))["version"] == result.version


def test_gate_fails_the_run_and_nothing_is_published(pipeline_env, local_s3):
    store, runs = pipeline_env
    layout = ArtifactLayout()
    model = "gated-cnn"
    with pytest.raises(PipelineFailed) as info:
        # a negative tolerance sits below any measured drop: INT8 would have to gain accuracy to pass
        run_local({"model_name": model, "bucket": store.bucket, "s3_endpoint": local_s3.endpoint_url,
                   **QUICK, "tolerance_points": -50.0}, runs_dir=runs)
    assert "GateFailed" in str(info.value) and "tolerance" in str(info.value)
    assert info.value.log_path is not None and info.value.log_path.exists()
    assert store.list_keys(layout.model_prefix(model)) == []
