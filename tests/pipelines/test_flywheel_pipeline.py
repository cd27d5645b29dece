"""The retraining pipeline's flywheel wiring: the plan's field triggers (new labels since the deployed version's
snapshot, their share, the hub's drift), warm starts from the deployed version's verified training checkpoint, the
lineage the manifest records, and the compiled pipeline's new parameters and steps. Real SeaweedFS (the session's),
a real hub on loopback for drift, real torch checkpoints."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import date, datetime, timezone
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from kfp import components

from components.data import DatasetSplits
from components.models import ModelSpec, build_model, read_training_checkpoint, save_checkpoint
from components.plan import FieldTriggers, Plan, TrainingConfig, decide, fingerprint, new_labelled_samples
from components.publish import field_lineage, move_channel, publish_version, training_record
from components.train import CHECKPOINT_FILE, fetch_warm_start, train_model
from edgeloop_core.contract import ArtifactLayout, Preprocessing
from edgeloop_core.contract.datasets import (
    DatasetLayout,
    DatasetSnapshot,
    SnapshotLabel,
    SnapshotShard,
    snapshot_digest,
)
from edgeloop_core.errors import ConfigError, DigestMismatch
from pipelines.cluster import compile_pipeline
from tests.conftest import make_staged_version

pytestmark = pytest.mark.integration

MODEL = "flywheel-cnn"
CONFIG = TrainingConfig(arch="cnn", epochs=1, lr=0.003, seed=0, prune_constraint="flops", prune_keep_fraction=0.6,
                        prune_finetune_epochs=1, qat_epochs=1, tolerance_points=1.0)
DIGITS = [str(d) for d in range(10)]


def splits(seed: int, classes: list[str] = DIGITS, field: dict | None = None, rows: int = 40) -> DatasetSplits:
    rng = np.random.default_rng(seed)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.random((n, 1, 8, 8), dtype=np.float32), rng.integers(0, len(classes), n).astype(np.int64)

    return DatasetSplits(*part(rows), *part(10), *part(10), labels=classes,
                         preprocessing=Preprocessing(kind="image", layout="NCHW"), source="test",
                         extra={"field": field} if field else {})


def shard(key: str, app_labels: int) -> SnapshotShard:
    return SnapshotShard(key=key, sha256=hashlib.sha256(key.encode()).hexdigest(), size_bytes=100, device="d1",
                         day=date(2026, 12, 5), items=app_labels + 5, app_labels=app_labels)


def label(key: str, source: str, content: str = "") -> SnapshotLabel:
    return SnapshotLabel(key=key, sha256=hashlib.sha256((key + content).encode()).hexdigest(), size_bytes=50,
                         source=source)


def put_snapshot(store, shards: list[SnapshotShard], labels: list[SnapshotLabel]) -> str:
    digest = snapshot_digest([(s.key, s.sha256) for s in shards], [(lab.key, lab.sha256) for lab in labels])
    snapshot = DatasetSnapshot(model=MODEL, digest=digest, created_at=datetime.now(timezone.utc), shards=shards,
                               labels=labels, devices=["d1"], days=[date(2026, 12, 5)], items=1, label_sources={})
    store.put_bytes(DatasetLayout().snapshot_key(MODEL, digest), snapshot.to_json())
    return digest


def publish_deployed(store, signing_key, tmp_path, version: str, training: dict, channel: str = "stable",
                     cloud_files: dict | None = None) -> None:
    manifest = make_staged_version(tmp_path / version, MODEL, version).model_copy(update={"training": training})
    layout = ArtifactLayout()
    publish_version(store, manifest, tmp_path / version, signing_key, layout=layout, cloud_files=cloud_files)
    move_channel(store, layout, MODEL, channel, version, signing_key)


@pytest.fixture(scope="module", autouse=True)
def s3_env(local_s3):
    """The steps' functions make their own S3 clients: credentials from the environment, as in a pipeline step."""
    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def field_bucket(local_s3, signing_key, tmp_path_factory):
    """A deployed v1 trained on the curated data and an old snapshot; a newer snapshot with 26 new app/human labels
    (25 in a new shard, 1 new human record; a teacher record does not count) of 57."""
    store = local_s3.store("flywheel-plan")
    old = put_snapshot(store, [shard("captures/d1/models/m/2026-12-05/a.parquet", 30)],
                       [label("labels/human/m/c1/0.json", "human")])
    new = put_snapshot(store, [shard("captures/d1/models/m/2026-12-05/a.parquet", 30),
                               shard("captures/d1/models/m/2026-12-06/b.parquet", 25)],
                       [label("labels/human/m/c1/0.json", "human"), label("labels/human/m/c2/0.json", "human"),
                        label("labels/teacher/m/c3/0.json", "teacher")])
    work = tmp_path_factory.mktemp("flywheel-plan")
    base = splits(0)
    base.save(work / "base.npz")
    mixed = splits(0, field={"snapshot": new})
    mixed.x_train = np.concatenate([mixed.x_train, mixed.x_train[:5]])  # field rows mixed in
    mixed.y_train = np.concatenate([mixed.y_train, mixed.y_train[:5]])
    mixed.save(work / "mixed.npz")
    publish_deployed(store, signing_key, work, "v1", {
        "fingerprint": "0" * 64, "base_fingerprint": fingerprint(base, CONFIG), "field": {"snapshot": old}})
    return SimpleNamespace(store=store, work=work, old=old, new=new, endpoint=local_s3.endpoint_url)


def plan(bucket, dataset: str = "mixed.npz", **kwargs) -> Plan:
    triggers = kwargs.pop("triggers", FieldTriggers())
    config = kwargs.pop("config", CONFIG)
    values = {"model_name": MODEL, "bucket": bucket.store.bucket, "prefix": "", "channel": "stable",
              "s3_endpoint": bucket.endpoint, "force_retrain": False,
              "base_dataset_path": str(bucket.work / "base.npz"), "triggers": triggers, **kwargs}
    return decide(str(bucket.work / dataset), config, **values)


def test_new_labels_are_counted_against_the_deployed_snapshot(field_bucket):
    store, layout = field_bucket.store, DatasetLayout()
    current = DatasetSnapshot.model_validate_json(store.get_bytes(layout.snapshot_key(MODEL, field_bucket.new)))
    old = DatasetSnapshot.model_validate_json(store.get_bytes(layout.snapshot_key(MODEL, field_bucket.old)))
    assert new_labelled_samples(current, old) == (26, 57)
    assert new_labelled_samples(current, None) == (57, 57)  # a deployed version without field data: all are new
    relabelled = current.model_copy(update={"labels": [label("labels/human/m/c1/0.json", "human", "again")]})
    assert new_labelled_samples(relabelled, old)[0] == 25 + 1  # a changed label is new knowledge


def test_too_few_new_labels_skip_and_say_so(field_bucket):
    result = plan(field_bucket)
    assert result.decision == "skip"
    assert result.reason == "only 26 new labelled field samples since v1's snapshot (< 50)"
    assert result.field == {"new_labelled": 26, "labelled": 57, "new_share": pytest.approx(26 / 57)}


def test_enough_new_labels_or_share_train_and_say_why(field_bucket):
    by_count = plan(field_bucket, triggers=FieldTriggers(min_new_labels=20))
    assert by_count.decision == "train"
    assert by_count.reason == "26 new labelled field samples since v1's snapshot (>= 20)"
    by_share = plan(field_bucket, triggers=FieldTriggers(min_new_labels=1000, min_new_share=0.4))
    assert by_share.decision == "train" and by_share.reason == "new labels are 46% of 57 (>= 40%)"
    too_small = plan(field_bucket, triggers=FieldTriggers(min_new_labels=1000, min_new_share=0.5))
    assert too_small.decision == "skip" and "share 46% < 50%" in too_small.reason


def test_an_unreachable_hub_is_said_and_never_triggers(field_bucket, monkeypatch):
    monkeypatch.setenv("HUB_READ_TOKEN", "reader")
    result = plan(field_bucket, triggers=FieldTriggers(drift_threshold=0.1, hub_address="127.0.0.1:9"))
    assert result.decision == "skip"
    assert "drift not checked: cannot reach the telemetry hub at 127.0.0.1:9" in result.reason
    assert "\n" not in result.reason
    monkeypatch.delenv("HUB_READ_TOKEN")
    no_token = plan(field_bucket, triggers=FieldTriggers(drift_threshold=0.1, hub_address="127.0.0.1:9"))
    assert no_token.decision == "skip" and "drift not checked: no hub_address or no HUB_READ_TOKEN" in no_token.reason


def test_drift_at_the_hub_triggers_training(field_bucket, monkeypatch, tmp_path):
    """A device that serves shifted digits reports drift to a real hub; the plan reads it with a reader token."""
    from components.plan import fleet_drift
    from edge_runtime.report.telemetry import Outbox, TelemetrySender
    from edgeloop_core.drift import FieldCounts, build_baseline
    from telemetry_hub.server import HubSettings, start_hub
    from telemetry_hub.store import HubStore
    from tests.telemetry_hub.test_drift import TASK, logits

    rng = np.random.default_rng(0)
    images, labels = rng.random((400, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 400)
    baseline = build_baseline({"input": images}, {"logits": logits(labels, 0)}, TASK)
    counts = FieldCounts(baseline)
    counts.add({"input": images * 0.2}, {"logits": logits(labels, 1)}, TASK)  # darker: the inputs drift
    field = {"samples": counts.samples, "counts": counts.take(),
             "baseline": {n: f.proportions for n, f in baseline.features.items()}}
    monkeypatch.setenv("HUB_READ_TOKEN", "reader")

    async def scenario() -> tuple[Plan, tuple]:
        settings = HubSettings(database_url="sqlite://", port=0, tokens="cam-dark:t1", read_tokens="reader")
        server, port, _ = await start_hub(settings, HubStore(f"sqlite:///{tmp_path / 'hub.sqlite'}"))
        try:
            outbox = Outbox(tmp_path / "outbox.sqlite", "cam-dark")
            outbox.add("stats", {"models": [{"model_name": MODEL, "state": "serving", "requests": 400,
                                             "field": field}]})
            sender = TelemetrySender(outbox, f"127.0.0.1:{port}", "t1")
            assert await sender.flush() == 1
            await sender.close()
            outbox.close()
            triggers = FieldTriggers(min_new_labels=1000, drift_threshold=0.2, hub_address=f"127.0.0.1:{port}")
            return (await asyncio.to_thread(plan, field_bucket, triggers=triggers),
                    await asyncio.to_thread(fleet_drift, f"127.0.0.1:{port}", MODEL))
        finally:
            await server.stop(0)

    result, (drift, device, problem) = asyncio.run(scenario())
    assert problem == "" and device == "cam-dark" and drift > 0.2
    assert result.decision == "train" and result.reason == f"drift {drift:.2f} on cam-dark (> 0.20)"
    assert result.field["drift"] == pytest.approx(drift)


def test_unchanged_data_skips_and_changed_curated_data_trains(field_bucket, signing_key, tmp_path):
    same = plan(field_bucket)
    publish_deployed(field_bucket.store, signing_key, tmp_path, "v2",
                     {"fingerprint": same.fingerprint, "base_fingerprint": same.base_fingerprint,
                      "field": {"snapshot": field_bucket.new}}, channel="same")
    skipped = plan(field_bucket, deployed_channel="same", triggers=FieldTriggers(min_new_labels=0))
    assert skipped.decision == "skip" and skipped.reason == "same data and config as the deployed v2: nothing to learn"
    warm = plan(field_bucket, deployed_channel="same", config=TrainingConfig(**{**vars(CONFIG), "warm_start": True}))
    assert warm.decision == "train" and warm.reason == (
        "curated data or config changed since the deployed v2; "
        "field: only 0 new labelled field samples since v2's snapshot (< 50)")  # what the field brings, said too
    other = splits(1)
    other.save(field_bucket.work / "other.npz")
    changed = plan(field_bucket, base_dataset_path=str(field_bucket.work / "other.npz"))
    assert changed.decision == "train" and changed.reason == (
        "curated data or config changed since the deployed v1; "
        "field: only 26 new labelled field samples since v1's snapshot (< 50)")
    assert plan(field_bucket, channel="stable", deployed_channel="nowhere").reason == \
        f"no version on channel 'nowhere' of {MODEL!r} yet"
    assert plan(field_bucket, force_retrain=True).reason == "forced (force_retrain=true)"


def test_plan_files_and_fingerprints_from_before_the_flywheel_still_read(tmp_path):
    old = {"decision": "skip", "fingerprint": "f" * 64, "config": {k: v for k, v in vars(CONFIG).items()
                                                                   if k != "warm_start"}}
    (tmp_path / "plan.json").write_text(json.dumps(old))
    loaded = Plan.load(tmp_path / "plan.json")
    assert (loaded.decision, loaded.reason, loaded.config) == ("skip", "", CONFIG)
    # the defaults keep the fingerprint of versions published before warm starts existed
    assert json.loads(CONFIG.to_json()) == old["config"]
    assert "warm_start" in TrainingConfig(**{**vars(CONFIG), "warm_start": True}).to_json()


@pytest.fixture(scope="module")
def warm_bucket(local_s3, signing_key, tmp_path_factory):
    """A deployed version that keeps its training checkpoint, published as the publish step does it."""
    store = local_s3.store("flywheel-warm")
    work = tmp_path_factory.mktemp("flywheel-warm")
    torch.manual_seed(7)
    spec = ModelSpec(arch="cnn", in_channels=1, image_size=8, num_classes=10)
    model = build_model(spec)
    save_checkpoint(model, spec, work / "dense")
    lineage = {"snapshot": "a" * 64, "ratio": 0.3, "train": {"samples": 3, "ids": ["c1:0", "c2:0"]},
               "slice": {"samples": 1, "ids": ["c3:0"], "device_of_row": ["d3"]}}
    key = ArtifactLayout().file_key(MODEL, "v1", CHECKPOINT_FILE)
    plan_record = Plan("train", "1" * 64, CONFIG, "forced (force_retrain=true)", "2" * 64)
    training, cloud = training_record(plan_record, splits(0, field=lineage), str(work / "dense"), work / "cloud", key)
    publish_deployed(store, signing_key, work, "v1", training, cloud_files=cloud)
    return SimpleNamespace(store=store, work=work, model=model, training=training, endpoint=local_s3.endpoint_url)


def warm(bucket, tmp_path, channel: str = "stable"):
    return fetch_warm_start(model_name=MODEL, bucket=bucket.store.bucket, prefix="", s3_endpoint=bucket.endpoint,
                            channel=channel, workdir=tmp_path)


def test_the_manifest_records_checkpoint_lineage_and_plan(warm_bucket):
    training, store = warm_bucket.training, warm_bucket.store
    ref = training["checkpoint"]
    assert ref["key"] == f"models/{MODEL}/v1/training/checkpoint.pt"
    data = store.get_bytes(ref["key"])
    assert hashlib.sha256(data).hexdigest() == ref["sha256"] and len(data) == ref["size_bytes"]
    manifest_files = [f.file for f in make_staged_version(warm_bucket.work / "files", MODEL, "v1").files()]
    assert CHECKPOINT_FILE not in manifest_files  # cloud-only: devices never download it
    assert training["plan"] == {"decision": "train", "reason": "forced (force_retrain=true)"}
    assert training["base_fingerprint"] == "2" * 64 and "warm_start" not in training
    assert training["field"]["train"] == {
        "samples": 3, "ids_sha256": hashlib.sha256(b'["c1:0","c2:0"]').hexdigest()}
    assert set(training["field"]["slice"]) == {"samples", "ids_sha256"}
    assert field_lineage({"snapshot": "x"}) == {"snapshot": "x"}


def test_warm_start_begins_from_the_deployed_weights(warm_bucket, tmp_path, monkeypatch, key_dir):
    monkeypatch.setenv("EDGELOOP_VERIFY_KEY_FILE", str(key_dir / "verify-key.pem"))
    base = warm(warm_bucket, tmp_path)
    assert base.lineage() == {"version": "v1", "checkpoint_sha256": warm_bucket.training["checkpoint"]["sha256"]}
    net, _, _ = train_model(splits(0), arch="cnn", epochs=0, progress=False, warm_start=base)
    for name, value in warm_bucket.model.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
    cold, _, _ = train_model(splits(0), arch="cnn", epochs=0, progress=False)
    assert not torch.equal(cold.state_dict()["features.0.weight"], warm_bucket.model.state_dict()["features.0.weight"])


def test_warm_start_refuses_what_does_not_fit_in_one_line(warm_bucket, tmp_path, monkeypatch, key_dir):
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))  # its public half verifies
    base = warm(warm_bucket, tmp_path)
    with pytest.raises(ConfigError) as classes:
        train_model(splits(0, classes=["a", "b", "c"]), arch="cnn", epochs=0, progress=False, warm_start=base)
    with pytest.raises(ConfigError) as arch:
        train_model(splits(0), arch="vit", epochs=0, progress=False, warm_start=base)
    with pytest.raises(ConfigError) as missing:
        warm(warm_bucket, tmp_path, channel="canary")
    assert str(classes.value) == ("warm start: the deployed v1 was trained as arch cnn, input 1x8x8, 10 classes, "
                                  "this run trains arch cnn, input 1x8x8, 3 classes: set warm_start=false to train "
                                  "from scratch")
    assert "was trained as arch cnn" in str(arch.value) and "this run trains arch vit" in str(arch.value)
    assert str(missing.value).startswith("no deployed version: channel 'canary' of 'flywheel-cnn' does not exist")


def test_a_tampered_checkpoint_is_refused(local_s3, signing_key, tmp_path, monkeypatch, key_dir, warm_bucket):
    monkeypatch.setenv("EDGELOOP_VERIFY_KEY_FILE", str(key_dir / "verify-key.pem"))
    store = local_s3.store("flywheel-tampered")
    key = ArtifactLayout().file_key(MODEL, "v1", CHECKPOINT_FILE)
    publish_deployed(store, signing_key, tmp_path, "v1", warm_bucket.training,
                     cloud_files={key: warm_bucket.work / "cloud" / "checkpoint.pt"})
    state = dict(warm_bucket.model.state_dict())
    state["features.0.weight"] = state["features.0.weight"] + 0.5  # someone's weights, same size and format
    torch.save({"format": "edgeloop-training-checkpoint/1", "spec": vars(ModelSpec("cnn", 1, 8, 10)),
                "state_dict": state}, tmp_path / "planted.pt")
    store.put_file(key, tmp_path / "planted.pt")
    bucket = SimpleNamespace(store=store, endpoint=local_s3.endpoint_url)
    with pytest.raises(DigestMismatch) as info:
        warm(bucket, tmp_path / "w")
    assert "training/checkpoint.pt" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "foreign.pt").write_bytes(b"PK\x03\x04 not a checkpoint")  # what a signed but foreign file reads as
    with pytest.raises(ConfigError) as foreign:
        read_training_checkpoint(tmp_path / "foreign.pt")
    assert str(foreign.value) == "foreign.pt is not an edgeloop training checkpoint (edgeloop-training-checkpoint/1)"
    publish_deployed(store, signing_key, tmp_path, "v0", {"fingerprint": "0" * 64}, channel="old")
    with pytest.raises(ConfigError) as none:
        warm(bucket, tmp_path / "w0", channel="old")
    assert "v0 has no training checkpoint" in str(none.value)


def test_compiled_pipeline_carries_the_flywheel_parameters_and_steps(tmp_path):
    path = compile_pipeline(tmp_path / "pipeline.yaml", s3_secret="edgeloop-s3", signing_secret="edgeloop-signing",
                            verify_secret="edgeloop-verify")
    inputs = components.load_component_from_file(str(path)).component_spec.inputs
    defaults = {"field_snapshot": "", "field_since": "", "field_ratio": 0.3, "field_slice_fraction": 0.3,
                "teacher": "", "teacher_min_confidence": 0.9, "warm_start": False, "deployed_channel": "",
                "field_gate": "beat", "field_tolerance_points": 0.0, "retrain_min_new_labels": 50,
                "retrain_min_new_share": 0.0, "retrain_drift_threshold": 0.0, "hub_address": "",
                "promote_from": "", "promote_window_s": 600}
    assert {name: inputs[name].default for name in defaults} == defaults
    spec, platform = yaml.safe_load_all(path.read_text())
    assert {"exec-field-data", "exec-plan", "exec-train", "exec-evaluate", "exec-report", "exec-gate",
            "exec-publish"} <= set(spec["deploymentSpec"]["executors"])
    tasks = next(c["dag"]["tasks"] for c in spec["components"].values() if "train" in c.get("dag", {}).get("tasks", {}))
    assert tasks["gate"]["dependentTasks"] == ["evaluate", "report"]
    assert "gate" in tasks["publish"]["dependentTasks"]
    assert tasks["publish"]["inputs"]["artifacts"]["dense_model"]["taskOutputArtifact"]["producerTask"] == "train"
    plan_inputs = spec["root"]["dag"]["tasks"]["plan"]["inputs"]["artifacts"]
    assert plan_inputs["dataset"]["taskOutputArtifact"]["producerTask"] == "field-data"
    assert plan_inputs["base_dataset"]["taskOutputArtifact"]["producerTask"] == "load-data"
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors = spec["deploymentSpec"]["executors"]
    for step in ("exec-promote", "exec-field-data", "exec-train", "exec-evaluate", "exec-publish"):
        assert kube[step]["secretAsEnv"][0]["secretName"] == "edgeloop-s3"
        env = {e["name"]: e["value"] for e in executors[step]["container"].get("env", [])}
        if step in ("exec-promote", "exec-publish"):  # they sign
            assert [(v["secretName"], v["mountPath"]) for v in kube[step]["secretAsVolume"]] == [
                ("edgeloop-signing", "/etc/edgeloop/signing")]
            assert env == {"EDGELOOP_SIGNING_KEY_FILE": "/etc/edgeloop/signing/signing-key.pem"}
        else:  # they only check the deployed version's signature: the public key, never the signing key
            assert [v["secretName"] for v in kube[step]["secretAsVolume"]] == ["edgeloop-verify"]
            assert env == {"EDGELOOP_VERIFY_KEY_FILE": "/etc/edgeloop/verify/verify-key.pem"}
    promote = next(t for c in spec["components"].values() for n, t in c.get("dag", {}).get("tasks", {}).items()
                   if n == "promote")
    assert promote["inputs"]["parameters"]["promote_to"]["componentInputParameter"].endswith("deployed_channel")
