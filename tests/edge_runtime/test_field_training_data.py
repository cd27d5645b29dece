"""Field data for training (components/field_data.py, components/teacher.py) from captures in the real SeaweedFS:
one device's captures made by the real runtime through tritonclient, the other devices' shards written by the
device's own shard writer (with the optional capture ``group`` column new shards carry). Checks the teacher's
pseudo-labels (from the deployed version, signature- and sha256-checked), the snapshot's train and slice ids, the
label precedence, x_field bit for bit, and the one-line refusals. Lives beside the runtime's tests to share their
session's trained model."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from datetime import date, datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from components.data import DatasetSplits, load_digits_dataset, load_synthetic_detection
from components.field_data import prepare_field_data
from components.teacher import run_teacher
from edge_runtime.report.capture.client import send_label
from edge_runtime.report.capture.records import CapturedItem, new_capture_id, table_of, tensor_record
from edgeloop.cli import app
from edgeloop_core.contract import ArtifactLayout, Preprocessing
from edgeloop_core.contract.captures import CaptureLayout, shard_name
from edgeloop_core.contract.datasets import DatasetLayout, LabelRecord
from edgeloop_core.errors import ConfigError, ContractError
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until
from tests.edge_runtime.test_capture import infer, shards_in

pytestmark = pytest.mark.integration
MODEL, DEVICE, TOKEN = "digits-cnn", "test-jetson", "s3cret"


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_digits_dataset()


def field_inputs(digits: DatasetSplits, start: int, n: int) -> np.ndarray:
    """Shifted field samples: training digits turned a quarter and noisier (none is a curated test image)."""
    x = np.rot90(digits.x_train[start:start + n], axes=(2, 3)).copy()
    return np.clip(x + np.random.default_rng(start).normal(0, 0.05, x.shape), 0, 1).astype(np.float32)


def put_shard(store, tmp_path, device: str, xs: np.ndarray, labels: list[int | None], group: str | None = None,
              day: date = date(2026, 12, 5)) -> list[str]:
    """One shard of one item per sample, written by the device's shard writer (plus the capture ``group`` column
    when given, as newer shards carry it); returns the capture ids."""
    when = datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc)
    items = [CapturedItem(capture_id=new_capture_id(), time=when, device_id=device, model=MODEL, version="v1",
                          variant="fp32", target_key="ort-cpu", request_id=f"{device}-{i}", policy="sample",
                          score=None, inputs=[tensor_record("input", xs[i:i + 1])],
                          outputs=[tensor_record("logits", np.zeros((1, 10), np.float32))],
                          label=None if y is None else json.dumps(y), label_source=None if y is None else "app",
                          label_time=None if y is None else when) for i, y in enumerate(labels)]
    table = table_of([item.row() for item in items]).sort_by("capture_id")
    if "group" in table.column_names:  # no group: a shard as devices wrote them before the column existed
        table = table.drop_columns(["group"])
    if group is not None:
        table = table.append_column("group", pa.array([group] * len(items), pa.string()))
    path = tmp_path / f"{device}.parquet"
    pq.write_table(table, path, compression="zstd")
    ids = [item.capture_id for item in items]
    store.put_bytes(CaptureLayout().shard_key(device, MODEL, day, shard_name(ids)), path.read_bytes())
    return ids


def capture_on_device(store, signing_key, trained, edge_settings, tmp_path, xs: np.ndarray, ys: np.ndarray) -> None:
    """Six requests through the real runtime: req-0 and req-1 labelled by the app while spooled (joined), req-2
    after upload (a device label record); the rest unlabelled."""
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 1.0}}],
                                   "capture": {"shard_max_items": 6, "shard_max_age_s": 3600}}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, repository_control=True,
                                     control_token=TOKEN))
    edge.wait_ready()
    try:
        for i in range(5):
            infer(edge, xs[i:i + 1], f"req-{i}")
        wait_until(lambda: edge.app.capture.spool.spooled() == 5)
        for i in (0, 1):
            assert send_label(edge.address, MODEL, f"req-{i}", str(int(ys[i])), source="app",
                              token=TOKEN).outcome == "joined"
        infer(edge, xs[5:6], "req-5")
        wait_until(lambda: len(shards_in(store)) == 1, timeout=20)
        assert send_label(edge.address, MODEL, "req-2", str(int(ys[2])), source="app", token=TOKEN).outcome == "record"
        wait_until(lambda: len(store.list_keys(CaptureLayout().device_prefix(DEVICE) + "labels/")) == 1, timeout=20)
    finally:
        edge.stop()


def prepare(store, tmp_path, dataset, out="out.npz", **overrides):
    options = dict(model_name=MODEL, bucket=store.bucket, prefix="", s3_endpoint=store.endpoint_url or "",
                   snapshot="latest", since="", ratio=0.3, slice_fraction=0.3, teacher="deployed",
                   teacher_min_confidence=0.3, seed=0, deployed_channel="stable")
    options.update(overrides)
    return prepare_field_data(str(dataset), str(tmp_path / out), **options)


def test_teacher_labels_and_a_field_slice_from_real_captures(store, s3_env, signing_key, trained, edge_settings,
                                                            key_dir, digits, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELOOP_VERIFY_KEY_FILE", str(key_dir / "verify-key.pem"))
    monkeypatch.setenv("EDGELOOP_S3_BUCKET", store.bucket)
    publish_model(store, signing_key, trained, "v1")
    xs, ys = field_inputs(digits, 0, 6), digits.y_train[:6]
    capture_on_device(store, signing_key, trained, edge_settings, tmp_path, xs, ys)
    sent = {f"req-{i}": xs[i] for i in range(6)}
    other = {"jetson-b": (field_inputs(digits, 10, 8), "alice"), "jetson-c": (field_inputs(digits, 20, 8), "alice"),
             "jetson-d": (field_inputs(digits, 30, 8), None), "jetson-e": (field_inputs(digits, 40, 8), "bob")}
    for device, (x, group) in other.items():
        start = {"jetson-b": 10, "jetson-c": 20, "jetson-d": 30, "jetson-e": 40}[device]
        labels = [int(y) if i < 5 else None for i, y in enumerate(digits.y_train[start:start + 8])]
        for i, capture_id in enumerate(put_shard(store, tmp_path, device, x, labels, group)):
            sent[capture_id] = x[i]

    made = CliRunner().invoke(app, ["data", "teacher-label", "--model", MODEL, "--min-confidence", "0.3"])
    assert made.exit_code == 0, made.output
    layout = DatasetLayout()
    records = [LabelRecord.model_validate_json(store.get_bytes(k))
               for k in store.list_keys(layout.labels_prefix("teacher", MODEL))]
    unlabelled_requests = {"req-3", "req-4", "req-5"} | {f"{d}-{i}" for d in other for i in (5, 6, 7)}
    assert records and {r.request_id for r in records} <= unlabelled_requests  # never an app-labelled sample
    assert {r.by for r in records} == {"digits-cnn/v1/fp32"} and all(r.source == "teacher" for r in records)
    assert all(float(r.origin.split("p=")[1].split(",")[0]) >= 0.3 for r in records)
    assert f"{len(records)} teacher labels" in made.output and "digits-cnn/v1/fp32" in made.output
    again = run_teacher(store, layout, ArtifactLayout(), MODEL, teacher="deployed", min_confidence=0.3)
    assert again.records == [] and again.already == len(records)  # labelled once: the snapshot stays the same

    dataset = tmp_path / "digits.npz"
    as_published = dataclasses.replace(digits, preprocessing=Preprocessing())  # the fixture's manifest says this
    as_published.save(dataset)
    lineage = prepare(store, tmp_path, dataset)
    assert lineage["deployed"] == {"channel": "stable", "version": "v1"}
    out = DatasetSplits.load(tmp_path / "out.npz")
    assert out.extra["field"] == json.loads(json.dumps(lineage)) and len(lineage["snapshot"]) == 64
    train, held = lineage["train"], lineage["slice"]
    assert not set(train["ids"]) & set(held["ids"]) and held["ids"]
    assert set(held["label_sources"]) <= {"app", "human"}
    assert train["label_sources"].get("teacher", 0) + lineage["dropped_teacher_labels"] == len(records)
    teacher_ids = {f"{r.capture_id}:{r.sample}" for r in records}
    assert not teacher_ids & set(held["ids"])
    assert not set(train["devices"]) & set(held["devices"])
    assert {"jetson-b", "jetson-c"} <= set(train["devices"]) or {"jetson-b", "jetson-c"} <= set(held["devices"])
    assert train["rows_in_train"] == round(0.3 * len(digits.x_train) / 0.7)
    assert len(out.x_train) == len(digits.x_train) + train["rows_in_train"]
    assert np.array_equal(out.x_test, digits.x_test) and np.array_equal(out.x_val, digits.x_val)
    ids_by_request = {}
    for key in [*shards_in(store), *[k for d in other for k in shards_in(store, d)]]:
        table = pq.read_table(pa.BufferReader(store.get_bytes(key)), columns=["capture_id", "request_id"])
        for row in table.to_pylist():  # the runtime's items by request id, the written shards' by capture id
            is_device = row["request_id"].startswith("req-")
            ids_by_request[row["capture_id"]] = row["request_id"] if is_device else row["capture_id"]
    for row, sample_id, device in zip(out.x_field, held["ids"], held["device_of_row"], strict=True):
        captured = sent[ids_by_request[sample_id.split(":")[0]]]
        assert row.tobytes() == captured.tobytes()  # the captured tensor, bit for bit
        assert device in held["devices"]
    curated = {r.tobytes() for r in np.concatenate([digits.x_test, digits.x_val])}
    assert not curated & {r.tobytes() for r in out.x_field}
    assert not curated & {r.tobytes() for r in out.x_train[len(digits.x_train):]}
    device_ids = {i for i in [*train["ids"], *held["ids"]] if ids_by_request[i.split(":")[0]].startswith("req-")}
    assert {ids_by_request[i.split(":")[0]] for i in device_ids} >= {"req-0", "req-1", "req-2"}  # joined + record

    same = prepare(store, tmp_path, dataset, out="same.npz", snapshot=lineage["snapshot"], teacher="")
    assert same["train"]["ids"] == train["ids"] and same["slice"]["ids"] == held["ids"]
    assert np.array_equal(DatasetSplits.load(tmp_path / "same.npz").x_train, out.x_train)  # the seed fixes the mix
    by_path = run_teacher(store, layout, ArtifactLayout(), MODEL, teacher=str(trained.good["fp32"]), min_confidence=0.3)
    assert {r.by for r in by_path.records} == {str(trained.good["fp32"])}  # another teacher replaces the records
    assert sorted((r.capture_id, r.label) for r in by_path.records) == sorted(  # same weights, same answers
        (r.capture_id, r.label) for r in records)
    shard = shards_in(store, "jetson-d")[0]
    store.put_bytes(shard, store.get_bytes(shard) + b" ")
    with pytest.raises(ContractError) as caught:
        prepare(store, tmp_path, dataset, out="tampered.npz", snapshot=lineage["snapshot"], teacher="")
    assert "changed since the snapshot" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "tampered.npz").exists()


def test_label_precedence_and_one_line_refusals(store, s3_env, digits, tmp_path):
    layout = DatasetLayout()
    xs = field_inputs(digits, 50, 4)
    ids_a = put_shard(store, tmp_path, "jetson-a", xs, [1, 2, None, None])
    ids_b = put_shard(store, tmp_path, "jetson-b", xs, [3, None, None, 4])
    publish_model_manifest_only(store, digits)
    now = datetime.now(timezone.utc)
    for capture_id, source, label in ((ids_a[0], "human", 7), (ids_a[1], "teacher", 8), (ids_a[2], "teacher", 9),
                                      (ids_b[1], "human", 5)):
        record = LabelRecord(capture_id=capture_id, model=MODEL, source=source, label=label, class_name=str(label),
                             time=now, by="someone")
        store.put_bytes(layout.label_key(source, MODEL, capture_id), record.model_dump_json().encode())
    dataset = tmp_path / "digits.npz"
    digits.save(dataset)
    lineage = prepare(store, tmp_path, dataset, teacher="", slice_fraction=0.5, ratio=0.5)
    out = DatasetSplits.load(tmp_path / "out.npz")
    label_of = dict(zip(lineage["slice"]["ids"], out.y_field.tolist(), strict=True))
    train_part = lineage["train"]
    held = lineage["slice"]
    assert held["samples"] > 0 and train_part["samples"] > 0
    expected = {f"{ids_a[0]}:0": 7, f"{ids_a[1]}:0": 2, f"{ids_b[0]}:0": 3, f"{ids_b[1]}:0": 5, f"{ids_b[3]}:0": 4}
    for sample_id, y in label_of.items():
        assert expected[sample_id] == y  # human over app, app over teacher
    assert f"{ids_a[2]}:0" not in held["ids"]  # a teacher's label never in the slice
    assert set(train_part["ids"]) | set(held["ids"]) | ({f"{ids_a[2]}:0"} if lineage["dropped_teacher_labels"]
                                                         else set()) >= set(expected)
    sources = Counter(train_part["label_sources"]) + Counter(held["label_sources"])
    sources["teacher"] += lineage["dropped_teacher_labels"]
    assert sources == {"human": 2, "app": 3, "teacher": 1}  # a1's app label beat its teacher's; a0's human its app
    assert lineage["unlabelled"] == 2 and lineage["deployed"] is None

    copied = prepare_field_data(str(dataset), str(tmp_path / "copy.npz"), model_name=MODEL, bucket=store.bucket,
                                prefix="", s3_endpoint="", snapshot="", since="", ratio=0.3, slice_fraction=0.3,
                                teacher="", teacher_min_confidence=0.9, seed=0, deployed_channel="")
    assert copied == {} and (tmp_path / "copy.npz").read_bytes() == dataset.read_bytes()

    detection = tmp_path / "detection.npz"
    load_synthetic_detection(sizes=(4, 2, 2)).save(detection)
    other_preprocessing = tmp_path / "other.npz"
    dataclasses.replace(digits, preprocessing=Preprocessing(scale=1 / 255)).save(other_preprocessing)
    refusals = [
        (dict(dataset=detection), ConfigError, "field data trains classifiers only"),
        (dict(ratio=1.0), ConfigError, "field_ratio must be in (0, 1)"),
        (dict(snapshot="0" * 64), ConfigError, "no snapshot 0000"),
        (dict(since="last week"), ConfigError, "is not a day"),
        (dict(teacher="/nowhere/teacher.onnx"), ConfigError, "cannot read it"),
        (dict(dataset=other_preprocessing, teacher=""), ConfigError, "is not the curated data's"),
    ]
    for overrides, error, words in refusals:
        with pytest.raises(error) as caught:
            prepare(store, tmp_path, overrides.pop("dataset", dataset), out="refused.npz", **overrides)
        assert words in str(caught.value) and "\n" not in str(caught.value)
        assert not (tmp_path / "refused.npz").exists()
    unknown = LabelRecord(capture_id=ids_b[2], model=MODEL, source="human", label=0, class_name="eleven", time=now)
    store.put_bytes(layout.label_key("human", MODEL, ids_b[2]), unknown.model_dump_json().encode())
    with pytest.raises(ConfigError) as caught:
        prepare(store, tmp_path, dataset, out="refused.npz", teacher="")
    assert "'eleven', a class the curated data lacks" in str(caught.value)
    for args, words in ((["--min-confidence", "0"], "minimum confidence must be in (0, 1]"),
                        (["--teacher", "s3://" + store.bucket + "/no/such.onnx"], "cannot read it")):
        refused = CliRunner().invoke(app, ["data", "teacher-label", "--model", MODEL, "--bucket", store.bucket, *args])
        assert isinstance(refused.exception, ConfigError) and words in str(refused.exception)
    assert store.list_keys(layout.labels_prefix("teacher", MODEL)) == [layout.label_key("teacher", MODEL, c)
                                                                       for c in sorted((ids_a[1], ids_a[2]))]


def publish_model_manifest_only(store, digits: DatasetSplits) -> None:
    """The manifest of v1 (what the field step reads of a captured version: classes, input, preprocessing)."""
    from edgeloop_core.contract import Manifest, TensorSpec, Validation, Variant

    ref = {"sha256": "0" * 64, "size_bytes": 1}
    manifest = Manifest(
        name=MODEL, version="v1", created_at=datetime.now(timezone.utc),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])], labels=[str(i) for i in range(10)],
        preprocessing=digits.preprocessing,
        variants=[Variant(file="fp32.onnx", name="fp32", precision="fp32", backends=["onnxruntime"], **ref)],
        validation=Validation(file="validation.npz", num_samples=1, reference={"fp32": 1.0}, tolerance=0.02, **ref))
    store.put_bytes(ArtifactLayout().manifest_key(MODEL, "v1"), manifest.to_json().encode())
