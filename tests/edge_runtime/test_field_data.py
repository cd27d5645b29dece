"""`edgeloop data`: field data from the real runtime (captured through tritonclient into the real SeaweedFS) listed,
exported to Label Studio's documented task format, annotated as Label Studio's JSON export holds annotations,
imported back as human label records, and fixed in a dataset snapshot named by its content hash.

The tasks and the export are checked three ways: against the format Label Studio's docs give
(https://labelstud.io/guide/tasks, /guide/predictions, /guide/export); by label-studio-sdk's LabelInterface, run from
its own venv (.tools/labelstudio: the SDK pins numpy and opencv versions this environment cannot take); and by
importing an export recorded from a real Label Studio 1.23.2 server (tests/data/labelstudio/SOURCE.md). See
docs/flywheel.md. This file lives beside the runtime's tests to share their session's trained model."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import wave
import xml.etree.ElementTree as ET
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edge_runtime.report.capture.client import send_label
from edge_runtime.report.capture.records import CapturedItem, new_capture_id, tensor_record, write_shard
from edgeloop.cli import app
from edgeloop_core.contract.captures import CaptureLayout, shard_name
from edgeloop_core.contract.datasets import DatasetLayout, DatasetSnapshot, LabelRecord, snapshot_digest
from edgeloop_core.errors import ConfigError
from tests.edge_runtime.conftest import RunningEdge, publish_model, wait_until
from tests.edge_runtime.test_capture import infer, shards_in

pytestmark = pytest.mark.integration
MODEL, DEVICE, TOKEN = "digits-cnn", "test-jetson", "s3cret"


def data(*args: str):
    result = CliRunner().invoke(app, ["data", *args])
    return result


def table_counts(output: str) -> dict[str, int]:
    """First cell -> count cell of every row of the tables `edgeloop data captures` prints."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if line.count("│") >= 4]
    return {row[0]: int(row[1]) for row in rows if row[1].isdigit()}


def png_of(uri: str, kind: str = "image/png") -> Image.Image:
    assert uri.startswith(f"data:{kind};base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def capture_four(store, signing_key, trained, edge_settings, tmp_path) -> dict[str, np.ndarray]:
    """Four requests captured by the real runtime: req-0 with a PNG payload, req-1 labelled while spooled (joined),
    req-3 labelled after upload (a device label record). Returns the outputs each request received."""
    publish_model(store, signing_key, trained, "v1")
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"models": [{"name": MODEL, "capture": {"sample_rate": 1.0}}],
                                   "capture": {"shard_max_items": 4, "shard_max_age_s": 3600}}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, repository_control=True,
                                     control_token=TOKEN))
    edge.wait_ready()
    try:
        payload = io.BytesIO()
        Image.new("L", (8, 8), 200).save(payload, format="PNG")
        answers = {}
        for i in range(3):
            x = trained.x_val[i:i + 1].astype(np.float32)
            answers[f"req-{i}"] = infer(edge, x, f"req-{i}", payload.getvalue() if i == 0 else None)
        wait_until(lambda: edge.app.capture.spool.spooled() == 3)
        assert send_label(edge.address, MODEL, "req-1", "4", source="app", token=TOKEN).outcome == "joined"
        answers["req-3"] = infer(edge, trained.x_val[3:4].astype(np.float32), "req-3")
        wait_until(lambda: len(shards_in(store)) == 1, timeout=20)
        assert send_label(edge.address, MODEL, "req-3", "5", source="app", token=TOKEN).outcome == "record"
        wait_until(lambda: len(store.list_keys(CaptureLayout().device_prefix(DEVICE) + "labels/")) == 1, timeout=20)
    finally:
        edge.stop()
    return answers


def annotate(tasks: list[dict], choices: dict[int, list[str]]) -> list[dict]:
    """``tasks`` as Label Studio's JSON export returns them once a person annotated task i with ``choices[i]``
    (several: several annotations, the last the latest; ``"cancel"``: a skipped one)."""
    exported = []
    for i, task in enumerate(tasks):
        annotations = []
        for n, choice in enumerate(choices.get(i, [])):
            stamp = f"2026-01-0{n + 1}T10:00:00.000000Z"
            annotations.append({
                "id": 100 * i + n, "completed_by": 7, "was_cancelled": choice == "cancel", "ground_truth": False,
                "created_at": stamp, "updated_at": stamp, "lead_time": 3.2, "task": i + 1, "project": 1,
                "result": [] if choice == "cancel" else [
                    {"id": f"r{i}{n}", "from_name": "label", "to_name": "image", "type": "choices",
                     "value": {"choices": [choice]}, "origin": "manual"}]})
        exported.append({"id": i + 1, "data": task["data"], "meta": task["meta"], "annotations": annotations,
                         "predictions": [{**task["predictions"][0], "id": i + 1, "task": i + 1}], "drafts": [],
                         "project": 1, "inner_id": i + 1, "total_annotations": len(annotations),
                         "cancelled_annotations": 0, "created_at": "2026-01-01T09:00:00Z",
                         "updated_at": "2026-01-01T09:00:00Z", "file_upload": None})
    return exported


def test_captures_go_to_label_studio_and_come_back_as_human_labels(store, signing_key, trained, edge_settings,
                                                                    s3_env, tmp_path, monkeypatch):
    answers = capture_four(store, signing_key, trained, edge_settings, tmp_path)
    monkeypatch.setenv("EDGELOOP_S3_BUCKET", store.bucket)

    listed = data("captures", "--model", MODEL)
    assert listed.exit_code == 0, listed.output
    assert "4 items (4 samples) in 1 shards" in listed.output
    counts = table_counts(listed.output)
    assert counts[DEVICE] == counts["sample"] == 4 and counts["app"] == counts["none"] == 2
    top1 = {str(int(y.argmax())) for y in answers.values()}
    assert sum(counts[c] for c in top1) == 4  # the classes are the top-1 answers the app received

    out = tmp_path / "tasks.json"
    exported = data("export-labelstudio", "--model", MODEL, "--out", str(out))
    assert exported.exit_code == 0, exported.output
    tasks = json.loads(out.read_text())
    config = ET.fromstring((tmp_path / "tasks.label-config.xml").read_text())
    image, choices = config.find("Image"), config.find("Choices")
    assert (image.get("name"), image.get("value")) == ("image", "$image")
    assert choices.get("toName") == "image" and [c.get("value") for c in choices] == [str(i) for i in range(10)]
    by_request = {t["meta"]["request_id"]: t for t in tasks}
    assert sorted(by_request) == sorted(answers)
    for request_id, y in answers.items():
        task = by_request[request_id]
        (prediction,) = task["predictions"]
        (result,) = prediction["result"]
        assert result == {"from_name": choices.get("name"), "to_name": image.get("name"), "type": "choices",
                          "value": {"choices": [str(int(y.argmax()))]}}  # the model's top-1, as the config names it
        assert task["data"]["capture_id"] == task["meta"]["capture_id"] and task["meta"]["device_id"] == DEVICE
        assert 0 < prediction["score"] <= 1
    assert png_of(by_request["req-0"]["data"]["image"]).size == (8, 8)  # the app's own payload, as attached
    rendered = png_of(by_request["req-2"]["data"]["image"])  # no payload: the tensor, rendered
    assert rendered.size == (256, 256) and rendered.mode == "L"
    expected = np.round(np.clip(trained.x_val[2, 0], 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(rendered)[::32, ::32], expected)

    unlabelled = data("export-labelstudio", "--model", MODEL, "--out", str(tmp_path / "u.json"), "--unlabelled-only")
    assert unlabelled.exit_code == 0, unlabelled.output
    assert sorted(t["meta"]["request_id"] for t in json.loads((tmp_path / "u.json").read_text())) == ["req-0", "req-2"]

    order = [t["meta"]["request_id"] for t in tasks]
    person = annotate(tasks, {order.index("req-0"): ["3", "8"], order.index("req-1"): ["cancel"],
                              order.index("req-2"): ["1"]})
    export = tmp_path / "export.json"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(annotate(tasks, {0: ["1"], 1: ["banana"]})))
    refused = data("import-labelstudio", str(bad), "--model", MODEL)
    assert isinstance(refused.exception, ConfigError) and "'banana' is not one of" in str(refused.exception)
    assert "\n" not in str(refused.exception)
    assert store.list_keys("labels/") == []  # a bad export writes nothing, not even its good tasks
    export.write_text(json.dumps(person))
    imported = data("import-labelstudio", str(export), "--model", MODEL)
    assert imported.exit_code == 0, imported.output
    assert "imported 2 human labels" in imported.output

    layout = DatasetLayout()
    records = {}
    for key in store.list_keys(layout.labels_prefix("human", MODEL)):
        record = LabelRecord.model_validate_json(store.get_bytes(key))
        assert key == layout.label_key("human", MODEL, record.capture_id, record.sample)
        records[record.request_id] = record
    assert sorted(records) == ["req-0", "req-2"]  # req-1's annotation was cancelled: no label
    assert (records["req-0"].label, records["req-0"].class_name) == (8, "8")  # the latest annotation wins
    assert records["req-0"].time == datetime(2026, 1, 2, 10, tzinfo=timezone.utc)
    assert (records["req-2"].label, records["req-2"].source, records["req-2"].by) == (1, "human", "7")
    assert records["req-0"].capture_id == by_request["req-0"]["meta"]["capture_id"]
    assert not [k for k in store.list_keys("captures/") if "/labels/" in k and "human" in k]

    relisted = data("captures", "--model", MODEL)
    assert table_counts(relisted.output)["human"] == 2
    again = data("export-labelstudio", "--model", MODEL, "--out", str(tmp_path / "u.json"), "--unlabelled-only")
    assert isinstance(again.exception, ConfigError) and "all labelled" in str(again.exception)


def put_shard(store, tmp_path, device: str, day: date, n: int, labelled: int = 0) -> tuple[str, list[str]]:
    """A shard of ``n`` items written by the device's own shard writer, uploaded where the device puts it."""
    when = datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc)
    items = [CapturedItem(capture_id=new_capture_id(), time=when, device_id=device, model=MODEL, version="v1",
                          variant="fp32", target_key="ort-cpu", request_id=f"{device}-{i}", policy="sample",
                          score=None, inputs=[tensor_record("input", np.zeros((1, 1, 8, 8), np.float32))],
                          outputs=[tensor_record("logits", np.eye(10, dtype=np.float32)[i % 10:i % 10 + 1])],
                          label="3" if i < labelled else None, label_source="app" if i < labelled else None,
                          label_time=when if i < labelled else None) for i in range(n)]
    ids = [item.capture_id for item in items]
    path = tmp_path / f"{device}-{day}.parquet"
    write_shard(path, [item.row() for item in items])
    key = CaptureLayout().shard_key(device, MODEL, day, shard_name(ids))
    store.put_bytes(key, path.read_bytes())
    return key, ids


def test_a_snapshot_is_named_by_its_content_and_says_what_it_holds(store, s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELOOP_S3_BUCKET", store.bucket)
    layout = DatasetLayout()
    put_shard(store, tmp_path, "jetson-a", date(2026, 1, 1), 3)
    _, ids_b = put_shard(store, tmp_path, "jetson-b", date(2026, 1, 2), 4, labelled=2)
    _, ids_c = put_shard(store, tmp_path, "jetson-a", date(2026, 1, 3), 2)
    human = LabelRecord(capture_id=ids_b[3], model=MODEL, source="human", label=2, time=datetime.now(timezone.utc))
    store.put_bytes(layout.label_key("human", MODEL, human.capture_id), human.model_dump_json().encode())
    stray = LabelRecord(capture_id="0" * 16 + "-" + "0" * 12, model=MODEL, source="human", label=1,
                        time=datetime.now(timezone.utc))  # labels an item no selected shard holds
    store.put_bytes(layout.label_key("human", MODEL, stray.capture_id), stray.model_dump_json().encode())

    out = tmp_path / "snapshot.json"
    made = data("snapshot", "--model", MODEL, "--since", "2026-01-02", "--out", str(out))
    assert made.exit_code == 0, made.output
    snapshot = DatasetSnapshot.model_validate_json(out.read_text())
    assert snapshot.devices == ["jetson-a", "jetson-b"] and snapshot.days == [date(2026, 1, 2), date(2026, 1, 3)]
    assert snapshot.items == 6 and len(snapshot.shards) == 2  # the 1 January shard is before --since
    assert snapshot.label_sources == {"app": 2, "human": 1}
    assert [lab.key for lab in snapshot.labels] == [layout.label_key("human", MODEL, ids_b[3])]
    for entry in [*snapshot.shards, *snapshot.labels]:
        assert entry.sha256 == hashlib.sha256(store.get_bytes(entry.key)).hexdigest()
    assert snapshot.digest == snapshot_digest([(s.key, s.sha256) for s in snapshot.shards],
                                              [(lab.key, lab.sha256) for lab in snapshot.labels])
    assert DatasetSnapshot.model_validate_json(store.get_bytes(layout.snapshot_key(MODEL, snapshot.digest))) == snapshot
    assert snapshot.digest[:16] in made.output

    same = data("snapshot", "--model", MODEL, "--since", "2026-01-02", "--out", str(tmp_path / "same.json"))
    assert same.exit_code == 0 and json.loads((tmp_path / "same.json").read_text()) == json.loads(out.read_text())
    relabelled = human.model_copy(update={"label": 5})
    store.put_bytes(layout.label_key("human", MODEL, human.capture_id), relabelled.model_dump_json().encode())
    changed = data("snapshot", "--model", MODEL, "--since", "2026-01-02", "--out", str(tmp_path / "changed.json"))
    assert changed.exit_code == 0, changed.output
    assert DatasetSnapshot.model_validate_json((tmp_path / "changed.json").read_text()).digest != snapshot.digest
    assert len(store.list_keys(layout.snapshots_prefix(MODEL))) == 2

    empty = data("snapshot", "--model", MODEL, "--since", "2027-01-01")
    assert isinstance(empty.exception, ConfigError) and "nothing to snapshot" in str(empty.exception)
    bad_day = data("snapshot", "--model", MODEL, "--since", "yesterday")
    assert isinstance(bad_day.exception, ConfigError) and "is not a day" in str(bad_day.exception)
    into_a_folder = data("snapshot", "--model", MODEL, "--out", str(tmp_path))
    assert isinstance(into_a_folder.exception, ConfigError) and "cannot write" in str(into_a_folder.exception)
    (tmp_path / "not-json.json").write_text("<html>")
    not_json = data("import-labelstudio", str(tmp_path / "not-json.json"), "--model", MODEL)
    assert isinstance(not_json.exception, ConfigError) and "not a readable JSON file" in str(not_json.exception)
    assert any(s.key.endswith(shard_name(ids_c)) for s in snapshot.shards)


def test_a_keyword_clip_without_its_wav_is_rendered_as_audio_a_person_can_hear():
    from components.labelstudio import labelling_config, render_audio
    from edgeloop_core.contract.manifest import Manifest, Preprocessing, Task
    from edgeloop_core.features import MelConfig, log_mel

    config = MelConfig()
    t = np.arange(config.sample_rate) / config.sample_rate
    clip = (0.5 * np.sin(2 * np.pi * 440 * t) * (t > 0.3) * (t < 0.7)).astype(np.float32)  # a tone in the middle
    features = log_mel(clip, config)
    mean, std = float(features.mean()), float(features.std())
    manifest = Manifest.model_construct(
        name="kws", version="v1", task=Task(kind="keyword_spotting"), labels=["yes", "no"],
        preprocessing=Preprocessing(kind="spectrogram", mean=[mean], std=[std], params=config.to_params()))
    wav_bytes = render_audio((features - mean) / std, manifest)
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768
    assert len(samples) == config.sample_rate
    loud = np.abs(samples).reshape(10, -1).mean(axis=1)
    assert loud[4:7].min() > 5 * loud[:2].max()  # the tone where it was, silence around it
    spectrum = np.abs(np.fft.rfft(samples[6000:10000]))
    assert abs(np.fft.rfftfreq(4000, 1 / 16000)[spectrum.argmax()] - 440) < 40  # at its pitch
    root = ET.fromstring(labelling_config(manifest))
    assert root.find("Audio").get("value") == "$audio" and root.find("Choices").get("toName") == "audio"


LABEL_STUDIO_PY = Path(__file__).resolve().parents[2] / ".tools" / "labelstudio" / "bin" / "python"


def test_label_studios_own_sdk_accepts_the_exported_project_and_the_annotations(store, s3_env, signing_key, trained,
                                                                                tmp_path, monkeypatch):
    """The same project checked by label-studio-sdk's LabelInterface (skips only without .tools/labelstudio, which
    `make test` installs; in CI the skip gate fails the run)."""
    if not LABEL_STUDIO_PY.exists():
        pytest.skip(f"no {LABEL_STUDIO_PY}: label-studio-sdk is not installed (make test installs it)")
    monkeypatch.setenv("EDGELOOP_S3_BUCKET", store.bucket)
    publish_model(store, signing_key, trained, "v1")
    put_shard(store, tmp_path, "jetson-a", date(2026, 1, 1), 3)
    assert data("export-labelstudio", "--model", MODEL, "--out", str(tmp_path / "tasks.json")).exit_code == 0
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    (tmp_path / "export.json").write_text(json.dumps(annotate(tasks, {0: ["2"], 1: ["cancel", "9"]})))
    bad = json.loads(json.dumps(tasks))
    bad[2]["predictions"][0]["result"][0]["value"]["choices"] = ["banana"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))

    def check(tasks_file: str) -> dict:
        ran = subprocess.run([str(LABEL_STUDIO_PY), str(Path(__file__).with_name("labelstudio_check.py")),
                              str(tmp_path / "tasks.label-config.xml"), str(tmp_path / tasks_file),
                              str(tmp_path / "export.json")], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr[-2000:]
        return json.loads(ran.stdout.splitlines()[-1])

    said = check("tasks.json")
    assert said["errors"] == [] and (said["tasks"], said["predictions"], said["annotations"]) == (3, 3, 2)
    sample = said["sample_annotation"]["result"][0]  # the shape the SDK gives a person's annotation: ours
    assert {k: sample[k] for k in ("from_name", "to_name", "type")} == {"from_name": "label", "to_name": "image",
                                                                         "type": "choices"}
    refused = check("bad.json")
    assert len(refused["errors"]) == 1 and "banana" in refused["errors"][0]  # the check has teeth


def test_an_export_recorded_from_a_real_label_studio_server_imports_as_its_annotations_say():
    """tests/data/labelstudio/SOURCE.md: Label Studio 1.23.2's own export of a project this exporter wrote."""
    from components.labelstudio import read_export

    class Manifests:  # the importer asks only for the class names of the captured versions
        def get(self, model, version):
            return type("Manifest", (), {"labels": [str(i) for i in range(10)]})()

    recorded = Path(__file__).resolve().parents[1] / "data" / "labelstudio" / "label-studio-1.23.2-export.json"
    tasks = json.loads(recorded.read_text())
    records = read_export(recorded, MODEL, Manifests(), {"v1"})
    assert [(r.request_id, r.label, r.class_name) for r in records] == [("req-0", 1, "1"), ("req-2", 3, "3")]
    assert [r.capture_id for r in records] == [tasks[0]["meta"]["capture_id"], tasks[2]["meta"]["capture_id"]]
    assert tasks[1]["annotations"][0]["was_cancelled"] and not tasks[3]["annotations"]  # left out, as they should be
    assert all(r.source == "human" and r.by == "1" and r.time.tzinfo is not None for r in records)
    assert records[0].origin == "label-studio task 1, annotation 1"
