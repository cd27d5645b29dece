"""Field data for training (docs/flywheel.md): a dataset snapshot's captured samples, each with one label (human >
app > teacher), split into field-train items and a held-out **field slice** by connected groups (device, and the
optional capture ``group`` such as a speaker), and the field-train items mixed into the curated training set at a
stated ratio.

Everything the step reads is checked against the snapshot: each shard and label record must still have the sha256
the snapshot recorded (a changed object is one :class:`~edgeloop_core.errors.ContractError` line). Captured inputs
are the model's preprocessed input tensors (the shard's ``inputs``), so a field sample is the captured tensor itself,
one row per sample of the request's batch, bit for bit; its shape and the capturing version's preprocessing must be
the curated data's.

The pure part (:func:`pick_label`, :func:`connected_groups`, :func:`split_field`, :func:`field_rows`) takes
:class:`FieldSample` values and is what the split's tests exercise; :func:`prepare_field_data` is the pipeline step.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from components.datasets import CLASSIFIER_TASKS, Manifests, parse_since
from components.field_labels import app_values, class_of
from edgeloop_core.contract.captures import tensor_array
from edgeloop_core.contract.datasets import DatasetLayout, DatasetSnapshot, LabelRecord, SnapshotFile
from edgeloop_core.contract.digest import sha256_bytes
from edgeloop_core.errors import ConfigError, ContractError, ObjectNotFound

if TYPE_CHECKING:
    from components.data import DatasetSplits
    from edgeloop_core.contract.layout import ArtifactLayout
    from edgeloop_core.contract.manifest import Manifest
    from edgeloop_core.store import ObjectStore

SOURCE_PRECEDENCE = ("human", "app", "teacher")
"""Which label a sample takes when several sources gave one: the first of these that did."""
TRUSTED_SOURCES = ("human", "app")
"""Sources a field slice may hold (a teacher's pseudo-label is never in a slice)."""
SHARD_COLUMNS = ("capture_id", "version", "request_id", "inputs", "label", "label_time")
T = TypeVar("T")
GROUP_COLUMN = "group"
"""Optional shard column (request parameter ``edgeloop.capture_group``, e.g. a speaker); absent in older shards."""


@dataclass(frozen=True)
class FieldSample:
    """One captured sample: ``id`` is ``<capture_id>:<sample>`` (``sample``: its index in the request's batch);
    ``label`` is a class index of the curated data (None: unlabelled) and ``source`` where it came from."""

    id: str
    device: str
    group: str = ""
    day: date | None = None
    label: int | None = None
    source: str | None = None

    @property
    def group_name(self) -> str:
        """``device`` or ``device/group``: how the lineage names where the sample came from."""
        return f"{self.device}/{self.group}" if self.group else self.device


def pick_label(candidates: Mapping[str, T]) -> tuple[T, str] | None:
    """The one label of a sample from what each source said (source → class): human > app > teacher."""
    for source in SOURCE_PRECEDENCE:
        if source in candidates:
            return candidates[source], source
    return None


def connected_groups(samples: Sequence[FieldSample]) -> list[str]:
    """A component name per sample: two samples are connected when they share a device or a non-empty capture
    group (directly or through others). The name is the component's smallest member (``device:...``/``group:...``),
    so it does not depend on the samples' order."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for sample in samples:
        device = find(f"device:{sample.device}")
        if sample.group:
            group = find(f"group:{sample.group}")
            if group != device:
                parent[max(group, device)] = min(group, device)
    return [find(f"device:{s.device}") for s in samples]


@dataclass
class FieldSplit:
    """Indices into the samples: ``train`` (labelled by any source, outside the slice's groups), ``slice``
    (app/human-labelled, whole groups), ``dropped`` (teacher-labelled samples of the slice's groups: in neither)."""

    train: list[int]
    slice: list[int]
    dropped: list[int]
    components: int = 0
    note: str = ""


def _order(component: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{component}".encode()).hexdigest()


def split_field(samples: Sequence[FieldSample], slice_fraction: float, seed: int) -> FieldSplit:
    """Hold out whole connected groups (:func:`connected_groups`) holding about ``slice_fraction`` of the app/human-
    labelled samples as the field slice; the rest of the labelled samples train. Groups are visited in a seeded hash
    order and one is taken when it brings the slice closer to the target; at least one group with trusted labels
    stays in training, and with two or more such groups the slice is never empty. Unlabelled samples are in neither.
    """
    if not 0 < slice_fraction < 1:
        raise ConfigError(f"field_slice_fraction must be in (0, 1), got {slice_fraction}")
    components = connected_groups(samples)
    trusted: Counter[str] = Counter(c for c, s in zip(components, samples, strict=True) if s.source in TRUSTED_SOURCES)
    eligible = sorted(trusted, key=lambda c: _order(c, seed))
    target = slice_fraction * sum(trusted.values())
    chosen: set[str] = set()
    taken = 0
    for component in eligible:
        if len(chosen) == len(eligible) - 1:
            break
        if abs(taken + trusted[component] - target) < abs(taken - target):
            chosen.add(component)
            taken += trusted[component]
    if not chosen and len(eligible) >= 2:
        chosen.add(min(eligible, key=lambda c: trusted[c]))  # min keeps the first of equals: the hash order
    note = "" if chosen else (f"no field slice: the labelled field samples form {len(eligible)} connected group "
                              "(devices sharing capture groups count as one); a slice needs two or more")
    split = FieldSplit([], [], [], components=len(set(components)), note=note)
    for index, (component, sample) in enumerate(zip(components, samples, strict=True)):
        if sample.label is None:
            continue
        if component not in chosen:
            split.train.append(index)
        elif sample.source in TRUSTED_SOURCES:
            split.slice.append(index)
        else:
            split.dropped.append(index)
    return split


def field_rows(base_rows: int, ratio: float) -> int:
    """Field rows to add to ``base_rows`` curated training rows so they make ``ratio`` of the training set."""
    if not 0 < ratio < 1:
        raise ConfigError(f"field_ratio must be in (0, 1), got {ratio}")
    return round(ratio * base_rows / (1.0 - ratio))


def mix_indices(items: int, rows: int, seed: int) -> np.ndarray:
    """``rows`` indices into ``items`` field-train items: seeded resampling with replacement."""
    if items == 0:
        return np.zeros(0, dtype=np.int64)
    return np.random.default_rng([seed, 27]).choice(items, size=rows, replace=True).astype(np.int64)


# --- reading a snapshot ------------------------------------------------------------------------------------------


def verified_bytes(store: ObjectStore, entry: SnapshotFile, digest: str) -> bytes:
    """The object ``entry`` names, checked against the sha256 the snapshot recorded."""
    try:
        data = store.get_bytes(entry.key)
    except ObjectNotFound as exc:
        raise ContractError(f"snapshot {digest[:16]}: s3 object {entry.key} is gone") from exc
    actual = sha256_bytes(data)
    if actual != entry.sha256:
        raise ContractError(f"snapshot {digest[:16]}: s3 object {entry.key} changed since the snapshot (sha256 "
                            f"{actual[:12]}…, the snapshot recorded {entry.sha256[:12]}…)")
    return data


def load_snapshot(store: ObjectStore, layout: DatasetLayout, model: str, digest: str) -> DatasetSnapshot:
    """The stored snapshot ``digest`` of ``model``."""
    try:
        snapshot = DatasetSnapshot.model_validate_json(store.get_bytes(layout.snapshot_key(model, digest)))
    except ObjectNotFound as exc:
        raise ConfigError(f"no snapshot {digest} of {model!r} at s3://{store.bucket}/"
                          f"{layout.snapshot_key(model, digest)}: build one with `edgeloop data snapshot`") from exc
    except ValueError as exc:
        raise ContractError(f"snapshot {digest[:16]} of {model!r} is not a valid snapshot") from exc
    if snapshot.model != model or snapshot.digest != digest:
        raise ContractError(f"snapshot at {layout.snapshot_key(model, digest)} describes {snapshot.model}/"
                            f"{snapshot.digest[:16]}: refusing it")
    return snapshot


def _shard_rows(data: bytes, key: str) -> list[dict[str, Any]]:
    """A shard's rows, the columns the step needs (the capture group when the shard has it)."""
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(io.BytesIO(data)).schema_arrow.names
        columns = [c for c in (*SHARD_COLUMNS, GROUP_COLUMN) if c in names]
        rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(data), columns=columns).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError for damaged or foreign files
        raise ContractError(f"s3 object {key} is not a readable capture shard ({type(exc).__name__})") from exc
    return rows


@dataclass
class FieldData:
    """The captured samples of a snapshot, their inputs (``x``, one row per sample) and what was left out."""

    samples: list[FieldSample] = field(default_factory=list)
    x: list[np.ndarray] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    teachers: set[str] = field(default_factory=set)


@dataclass
class _Capture:
    device: str
    group: str
    day: date
    batch: int
    manifest: Manifest
    request_id: str
    inputs: np.ndarray


class FieldReader:
    """Reads a snapshot's captures and labels into :class:`FieldData` for the curated ``data``."""

    def __init__(self, store: ObjectStore, artifacts: ArtifactLayout, snapshot: DatasetSnapshot,
                 data: DatasetSplits) -> None:
        self.store, self.snapshot, self.data = store, snapshot, data
        self.manifests = Manifests(store, artifacts)
        self.checked: set[str] = set()
        self.captures: dict[str, _Capture] = {}
        self.by_request: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.candidates: dict[tuple[str, int], dict[str, tuple[str, datetime | None]]] = defaultdict(dict)
        self.result = FieldData()

    def read(self) -> FieldData:
        """Every captured sample, with its label."""
        for shard in self.snapshot.shards:
            for row in _shard_rows(verified_bytes(self.store, shard, self.snapshot.digest), shard.key):
                self._capture(row, shard.device, shard.day)
        for entry in self.snapshot.labels:
            self._label_record(entry)
        for capture_id in sorted(self.captures, key=lambda c: (self.captures[c].device, c)):
            capture = self.captures[capture_id]
            for sample in range(capture.batch):
                said = self.candidates.get((capture_id, sample), {})
                picked = pick_label({source: name for source, (name, _) in said.items()})
                self.result.samples.append(FieldSample(
                    id=f"{capture_id}:{sample}", device=capture.device, group=capture.group, day=capture.day,
                    label=self._index(picked[0], capture_id) if picked else None,
                    source=picked[1] if picked else None))
                self.result.x.append(capture.inputs[sample])
        return self.result

    def _index(self, name: str, capture_id: str) -> int:
        if name not in self.data.labels:
            raise ConfigError(f"capture {capture_id} is labelled {name!r}, a class the curated data lacks "
                              f"({', '.join(self.data.labels)}): relabel it or add the class to the data")
        return self.data.labels.index(name)

    def _manifest(self, version: str, capture_id: str) -> Manifest | None:
        manifest = self.manifests.get(self.snapshot.model, version)
        if manifest is None or version in self.checked:
            return manifest
        if manifest.task.kind not in CLASSIFIER_TASKS:
            raise ConfigError(f"{self.snapshot.model}/{version} is a {manifest.task.kind} model: field data trains "
                              f"classifiers only ({', '.join(CLASSIFIER_TASKS)}) so far")
        check_preprocessing(manifest, self.data, capture_id)
        self.checked.add(version)
        return manifest

    def _capture(self, row: dict[str, Any], device: str, day: date) -> None:
        capture_id = row["capture_id"]
        manifest = self._manifest(row["version"], capture_id)
        if manifest is None:
            self.result.skipped["version without a manifest"] += 1
            return
        inputs = captured_input(row["inputs"], manifest, self.data.input_shape, capture_id)
        capture = _Capture(device, row.get(GROUP_COLUMN) or "", day, len(inputs), manifest,
                           row["request_id"] or "", inputs)
        self.captures[capture_id] = capture
        if capture.request_id:
            self.by_request[(device, capture.request_id)].append(capture_id)
        if row["label"] is not None:
            self._app_label(capture_id, row["label"], row["label_time"])

    def _app_label(self, capture_id: str, text: str, when: datetime | None) -> None:
        capture = self.captures[capture_id]
        try:
            value = json.loads(text)
        except ValueError:
            self.result.skipped["app label that is not JSON"] += 1
            return
        pairs = app_values(value, capture.batch)
        if not pairs:
            self.result.skipped["app label that fits no sample"] += 1
        for sample, item in pairs:
            name = class_of(item, capture.manifest)
            if name is None:
                self.result.skipped["app label that names no class"] += 1
                continue
            earlier = self.candidates[(capture_id, sample)].get("app")
            if earlier is None or (when is not None and (earlier[1] is None or when >= earlier[1])):
                self.candidates[(capture_id, sample)]["app"] = (name, when)

    def _label_record(self, entry: Any) -> None:  # noqa: ANN401 - a SnapshotLabel
        data = verified_bytes(self.store, entry, self.snapshot.digest)
        if entry.source == "app":  # a device label record, joined by request id on its device
            try:
                record = json.loads(data)
                when = datetime.fromisoformat(record["time"])
                request_id, value = str(record["request_id"]), record["label"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ContractError(f"s3 object {entry.key} is not a device label record") from exc
            for capture_id in self.by_request.get((entry.device, request_id), []):
                self._app_label(capture_id, json.dumps(value), when)
            return
        try:
            label = LabelRecord.model_validate_json(data)
        except ValueError as exc:
            raise ContractError(f"s3 object {entry.key} is not a label record") from exc
        capture = self.captures.get(label.capture_id)
        if capture is None or label.sample >= capture.batch:
            self.result.skipped[f"{label.source} label of no captured sample"] += 1
            return
        name = label.class_name or class_of(label.label, capture.manifest)
        if name is None:
            raise ContractError(f"s3 object {entry.key}: label {label.label!r} names no class of "
                                f"{self.snapshot.model}")
        self.candidates[(label.capture_id, label.sample)][label.source] = (name, label.time)
        if label.source == "teacher":
            self.result.teachers.add(label.by)


def captured_input(inputs: list[dict[str, Any]], manifest: Manifest, sample_shape: tuple[int, ...],
                   capture_id: str) -> np.ndarray:
    """The captured model input (the manifest's input name) as float32 ``[batch, *sample_shape]``."""
    name = manifest.inputs[0].name if manifest.inputs else None
    tensor = next((t for t in inputs if t["name"] == name), inputs[0] if len(inputs) == 1 else None)
    if tensor is None:
        raise ContractError(f"capture {capture_id} holds no input {name!r} (it has "
                            f"{', '.join(t['name'] for t in inputs) or 'none'})")
    if tensor["dtype"] == "bytes" or np.dtype(tensor["dtype"]).kind != "f":
        raise ConfigError(f"capture {capture_id}: input {tensor['name']!r} is {tensor['dtype']}, not a float "
                          "tensor: field data trains on preprocessed float inputs only")
    array = tensor_array(tensor)
    if array.ndim != len(sample_shape) + 1 or tuple(array.shape[1:]) != tuple(sample_shape):
        raise ConfigError(f"capture {capture_id}: input {tensor['name']!r} has shape {list(array.shape)}, the "
                          f"curated data's samples are {list(sample_shape)} (batch first): not the same model input")
    return array.astype(np.float32, copy=False)


def check_preprocessing(manifest: Manifest, data: DatasetSplits, capture_id: str) -> None:
    """The capturing version must have preprocessed its inputs as the curated data is (kind, layout, scale, mean,
    std, and the parameters both name), or its captured tensors mean something else."""
    ours, theirs = data.preprocessing, manifest.preprocessing
    same = (ours.kind == theirs.kind and ours.layout.upper() == theirs.layout.upper()
            and math.isclose(ours.scale, theirs.scale, rel_tol=1e-5)
            and len(ours.mean) == len(theirs.mean) and np.allclose(ours.mean, theirs.mean, rtol=1e-5, atol=1e-7)
            and len(ours.std) == len(theirs.std) and np.allclose(ours.std, theirs.std, rtol=1e-5, atol=1e-7)
            and all(str(ours.params[k]) == str(theirs.params[k]) for k in ours.params.keys() & theirs.params.keys()))
    if not same:
        raise ConfigError(f"capture {capture_id} was made by {manifest.name}/{manifest.version}, whose preprocessing "
                          f"({theirs.kind}, {theirs.layout}, scale {theirs.scale:g}, mean {theirs.mean}, std "
                          f"{theirs.std}) is not the curated data's: its inputs cannot train this model")


# --- the pipeline step -------------------------------------------------------------------------------------------


def _part(samples: Sequence[FieldSample], indices: Iterable[int]) -> dict[str, Any]:
    chosen = [samples[i] for i in indices]
    return {"samples": len(chosen), "devices": sorted({s.device for s in chosen}),
            "groups": sorted({s.group_name for s in chosen}),
            "days": sorted({s.day.isoformat() for s in chosen if s.day is not None}),
            "label_sources": dict(sorted(Counter(str(s.source) for s in chosen).items())),
            "ids": [s.id for s in chosen]}


def mix_field(data: DatasetSplits, field_data: FieldData, split: FieldSplit, *, ratio: float,
              seed: int) -> tuple[DatasetSplits, dict[str, Any]]:
    """The curated data with the field-train samples resampled into its training set at ``ratio`` and the field
    slice as ``x_field``/``y_field``; and the lineage's train and slice parts."""
    from components.data import DatasetSplits

    if not split.train:
        raise ConfigError("the snapshot holds no labelled field samples outside the field slice to train on: label "
                          "some (app, Label Studio or a teacher) or capture from more devices")
    samples = field_data.samples
    rows = field_rows(len(data.x_train), ratio)
    picks = np.asarray(split.train, dtype=np.int64)[mix_indices(len(split.train), rows, seed)]
    x_rows = np.stack([field_data.x[i] for i in picks]) if rows else data.x_train[:0]
    y_rows = np.asarray([samples[i].label for i in picks], dtype=np.int64)
    x_slice = (np.stack([field_data.x[i] for i in split.slice]) if split.slice
               else np.zeros((0, *data.input_shape), np.float32))
    mixed = DatasetSplits(
        np.concatenate([data.x_train, x_rows.astype(data.x_train.dtype, copy=False)]),
        np.concatenate([data.y_train, y_rows]), data.x_val, data.y_val, data.x_test, data.y_test,
        labels=data.labels, preprocessing=data.preprocessing, source=data.source, extra=dict(data.extra),
        x_field=x_slice.astype(np.float32, copy=False),
        y_field=np.asarray([samples[i].label for i in split.slice], dtype=np.int64))
    train = {**_part(samples, split.train), "rows_in_train": int(rows)}
    part = _part(samples, split.slice)
    part["label_sources"] = {k: v for k, v in part["label_sources"].items() if k in TRUSTED_SOURCES}
    part["device_of_row"] = [samples[i].device for i in split.slice]
    return mixed, {"train": train, "slice": part}




def deployed_version(store: ObjectStore, artifacts: ArtifactLayout, model: str, channel: str) -> str | None:
    """The version ``channel`` points at (not signature-checked: for the lineage only); None without one."""
    from edgeloop_core.published import resolve_version

    if not channel:
        return None
    try:
        return resolve_version(store, artifacts, model, channel)
    except (ObjectNotFound, ContractError):
        return None


def prepare_field_data(dataset_path: str, out_path: str, *, model_name: str, bucket: str, prefix: str,
                       s3_endpoint: str, snapshot: str, since: str, ratio: float, slice_fraction: float,
                       teacher: str, teacher_min_confidence: float, seed: int,
                       deployed_channel: str) -> dict[str, Any]:
    """The pipeline's field-data step: copy the dataset unchanged when ``snapshot`` is empty (returns ``{}``);
    otherwise write it with the snapshot's field-train samples mixed into the training set at ``ratio`` and the
    field slice (``slice_fraction`` of the app/human-labelled samples, whole connected groups) as
    ``x_field``/``y_field``, and return the lineage (also in ``extra["field"]``; docs/flywheel.md).

    ``snapshot``: ``latest`` builds one now of the model's captures from day ``since`` on (after writing the
    ``teacher``'s pseudo-labels when one is named: ``deployed`` for the ``deployed_channel``'s fp32-dense model, or
    an ONNX path or ``s3://`` URI), or the 64-hex digest of a stored snapshot. S3 credentials: boto3's usual chain.
    """
    from components.data import DatasetSplits
    from components.datasets import build_snapshot
    from edgeloop_core.contract import ArtifactLayout
    from edgeloop_core.files import atomic_output
    from edgeloop_core.store import ObjectStore

    if not snapshot:
        with atomic_output(Path(out_path)) as tmp:
            shutil.copyfile(dataset_path, tmp)
        return {}
    field_rows(1, ratio)  # checks the ratio before any work
    if not 0 < slice_fraction < 1:
        raise ConfigError(f"field_slice_fraction must be in (0, 1), got {slice_fraction}")
    data = DatasetSplits.load(dataset_path)
    if data.task != "classification":
        raise ConfigError(f"field_snapshot is set but {data.source} is a {data.task} data set: field data trains "
                          f"classifiers only ({', '.join(CLASSIFIER_TASKS)}) so far; leave field_snapshot empty")
    store, layout, artifacts = ObjectStore(bucket, endpoint_url=s3_endpoint or None), DatasetLayout(prefix), \
        ArtifactLayout(prefix)
    identity = ""
    if snapshot == "latest":
        if teacher:
            from components.teacher import run_teacher

            identity = run_teacher(store, layout, artifacts, model_name, teacher=teacher,
                                   min_confidence=teacher_min_confidence, since=parse_since(since, "field_since"),
                                   channel=deployed_channel or "stable").identity
        fixed = build_snapshot(store, layout, model_name, parse_since(since, "field_since"))
    else:
        fixed = load_snapshot(store, layout, model_name, snapshot)
    field_data = FieldReader(store, artifacts, fixed, data).read()
    split = split_field(field_data.samples, slice_fraction, seed)
    mixed, parts = mix_field(data, field_data, split, ratio=ratio, seed=seed)
    version = deployed_version(store, artifacts, model_name, deployed_channel)
    lineage = {"snapshot": fixed.digest, "since": fixed.since.isoformat() if fixed.since else None,
               "ratio": ratio, "slice_fraction": slice_fraction,
               "teacher": identity or ", ".join(sorted(field_data.teachers)),
               "teacher_min_confidence": teacher_min_confidence, **parts,
               "dropped_teacher_labels": len(split.dropped), "unlabelled": sum(s.label is None
                                                                                for s in field_data.samples),
               "skipped": dict(sorted(field_data.skipped.items())), "note": split.note,
               "deployed": {"channel": deployed_channel, "version": version} if version else None}
    mixed.extra["field"] = lineage
    with atomic_output(Path(out_path)) as tmp:
        mixed.save(tmp)
    return lineage
