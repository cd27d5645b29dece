"""Field data in the cloud: find the capture shards devices uploaded, read what they hold (only the columns asked
for), count them, gather their labels from all three sources, and fix a selection as a dataset snapshot named by
its content hash (docs/flywheel.md). Plain functions over an :class:`~edgeloop_core.store.ObjectStore`; the
``edgeloop data`` command and, later, the retraining pipeline's steps call them.

Shards are downloaded whole (one GET each; they are small: at most ``shard_max_items`` items) and decoded by
pyarrow column by column, so listing never decodes the inputs or payloads.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from edgeloop_core.contract.captures import CAPTURE_COLUMNS, tensor_array
from edgeloop_core.contract.datasets import (
    CLOUD_LABEL_SOURCES,
    DatasetLayout,
    DatasetSnapshot,
    LabelRecord,
    SnapshotLabel,
    SnapshotShard,
    snapshot_digest,
)
from edgeloop_core.contract.digest import sha256_bytes
from edgeloop_core.contract.layout import ArtifactLayout
from edgeloop_core.contract.manifest import Manifest
from edgeloop_core.errors import ConfigError, ContractError, ObjectNotFound
from edgeloop_core.store import ObjectStore

CLASSIFIER_TASKS = ("classification", "keyword_spotting")


@dataclass(frozen=True)
class ShardRef:
    """A capture shard's key and what its key says: ``captures/<device>/models/<model>/<day>/<name>.parquet``."""

    key: str
    device: str
    model: str
    day: date


@dataclass(frozen=True)
class DeviceLabelRef:
    """A device label record's key: ``captures/<device>/labels/<model>/<day>/<label-id>.json``."""

    key: str
    device: str
    model: str
    day: date


def parse_since(text: str | None, what: str) -> date | None:
    """A first capture day as given (``yyyy-mm-dd``; empty or None: all days); a ConfigError naming ``what`` (the
    option or parameter) otherwise."""
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r} is not a day (yyyy-mm-dd)") from exc


def _parse_day(text: str, key: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ContractError(f"s3 key {key!r} has no capture day (yyyy-mm-dd) where the layout puts one") from exc


def find_captures(store: ObjectStore, layout: DatasetLayout, model: str | None = None,
                  since: date | None = None) -> tuple[list[ShardRef], list[DeviceLabelRef]]:
    """Every capture shard and device label record in the bucket (of ``model``; from day ``since`` on), sorted by
    key. Keys that do not follow the layout are skipped (another tool's files beside ours)."""
    root = layout.captures_prefix()
    shards: list[ShardRef] = []
    labels: list[DeviceLabelRef] = []
    for device in store.list_prefixes(root):
        for kind in ("models", "labels"):
            below = f"{root}{device}/{kind}/" + (f"{model}/" if model else "")
            for key in store.list_keys(below):
                parts = key[len(root):].split("/")
                if len(parts) != 5 or not parts[4].endswith(".parquet" if kind == "models" else ".json"):
                    continue
                day = _parse_day(parts[3], key)
                if since is not None and day < since:
                    continue
                if kind == "models":
                    shards.append(ShardRef(key, device, parts[2], day))
                else:
                    labels.append(DeviceLabelRef(key, device, parts[2], day))
    return sorted(shards, key=lambda s: s.key), sorted(labels, key=lambda s: s.key)


@dataclass
class ShardData:
    """A downloaded shard: its rows (only the columns read), its sha256 and size."""

    ref: ShardRef
    rows: list[dict[str, Any]]
    sha256: str
    size_bytes: int


def read_shard(store: ObjectStore, ref: ShardRef, columns: Iterable[str]) -> ShardData:
    """Download a shard and decode only ``columns`` (names from CAPTURE_COLUMNS)."""
    wanted = list(dict.fromkeys(columns))
    unknown = [c for c in wanted if c not in CAPTURE_COLUMNS]
    if unknown:
        raise ConfigError(f"no such capture column(s): {', '.join(unknown)}; columns: {', '.join(CAPTURE_COLUMNS)}")
    data = store.get_bytes(ref.key)
    try:
        table = pq.read_table(io.BytesIO(data), columns=wanted)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError for damaged or foreign files
        raise ContractError(f"s3 object {ref.key} is not a readable capture shard ({type(exc).__name__})") from exc
    return ShardData(ref, table.to_pylist(), sha256_bytes(data), len(data))




class Manifests:
    """The manifests of the versions captures name, read once each. Not signature-checked: they only name classes
    and the task here (a training step that uses the weights verifies its base version)."""

    def __init__(self, store: ObjectStore, layout: ArtifactLayout) -> None:
        self.store, self.layout, self._seen = store, layout, {}  # type: dict[tuple[str, str], Manifest | None]

    def get(self, model: str, version: str) -> Manifest | None:
        """The manifest of ``model/version``; None when it is gone or unreadable."""
        if (model, version) not in self._seen:
            try:
                manifest: Manifest | None = Manifest.from_json(
                    self.store.get_bytes(self.layout.manifest_key(model, version)))
            except (ObjectNotFound, ContractError, ValueError):
                manifest = None
            self._seen[(model, version)] = manifest
        return self._seen[(model, version)]


def class_scores(manifest: Manifest | None, outputs: list[dict[str, Any]]) -> np.ndarray | None:
    """A classifier's per-sample class scores ``[samples, classes]`` from a captured item's outputs (the output
    the task's ``logits`` role names, or the only output), softmaxed when they are not probabilities already; None
    for other tasks."""
    if manifest is None or manifest.task.kind not in CLASSIFIER_TASKS or not outputs:
        return None
    name = manifest.task.roles.get("logits") or (manifest.outputs[0].name if len(manifest.outputs) == 1 else None)
    chosen = next((o for o in outputs if o["name"] == name), None) if name else None
    if chosen is None or chosen["dtype"] == "bytes":
        return None
    scores = tensor_array(chosen).astype(np.float64)
    scores = scores.reshape(scores.shape[0] if scores.ndim else 1, -1)
    is_probability = np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    if not is_probability:
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
    return scores


def class_name(manifest: Manifest | None, index: int) -> str:
    """The manifest's name for class ``index`` (its index as text when the manifest has no labels)."""
    labels = manifest.labels if manifest is not None else []
    return labels[index] if 0 <= index < len(labels) else str(index)


def cloud_labels(store: ObjectStore, layout: DatasetLayout, model: str) -> dict[str, dict[str, str]]:
    """Keys of the cloud label records of ``model``: source → {key → capture id}."""
    found: dict[str, dict[str, str]] = {}
    for source in CLOUD_LABEL_SOURCES:
        prefix = layout.labels_prefix(source, model)
        found[source] = {key: key[len(prefix):].split("/")[0] for key in store.list_keys(prefix)
                         if key.endswith(".json")}
    return found


@dataclass
class CaptureSummary:
    """What the field sent home: counts per device, class (classifiers: the top-1 per sample), policy and label
    source (an item with several sources counts once for each)."""

    shards: int = 0
    items: int = 0
    samples: int = 0
    per_model: Counter[str] = field(default_factory=Counter)
    per_device: Counter[str] = field(default_factory=Counter)
    per_class: Counter[str] = field(default_factory=Counter)
    per_policy: Counter[str] = field(default_factory=Counter)
    per_label_source: Counter[str] = field(default_factory=Counter)


def summarize_captures(store: ObjectStore, layout: DatasetLayout, artifacts: ArtifactLayout,
                       model: str | None = None, since: date | None = None) -> CaptureSummary:
    """Count the captures in the bucket (:class:`CaptureSummary`), reading only the columns it needs."""
    shards, device_labels = find_captures(store, layout, model, since)
    manifests = Manifests(store, artifacts)
    summary = CaptureSummary(shards=len(shards))
    labelled_by: dict[str, set[str]] = {}  # capture id -> sources
    requests: dict[tuple[str, str, str], str] = {}  # (device, model, request id) -> capture id
    for ref in shards:
        shard = read_shard(store, ref, ("capture_id", "version", "request_id", "policy", "outputs", "label"))
        for row in shard.rows:
            summary.items += 1
            summary.per_model[ref.model] += 1
            summary.per_device[ref.device] += 1
            summary.per_policy[row["policy"]] += 1
            manifest = manifests.get(ref.model, row["version"])
            scores = class_scores(manifest, row["outputs"])
            summary.samples += len(scores) if scores is not None else 1
            for index in scores.argmax(axis=1) if scores is not None else ():
                summary.per_class[class_name(manifest, int(index))] += 1
            if row["label"] is not None:
                labelled_by.setdefault(row["capture_id"], set()).add("app")
            if row["request_id"]:
                requests[(ref.device, ref.model, row["request_id"])] = row["capture_id"]
    for label in device_labels:
        record = _json_object(store, label.key)
        capture_id = requests.get((label.device, label.model, str(record.get("request_id", ""))))
        if capture_id is not None:
            labelled_by.setdefault(capture_id, set()).add("app")
    for name in sorted({ref.model for ref in shards}):
        for source, keys in cloud_labels(store, layout, name).items():
            for capture_id in keys.values():
                labelled_by.setdefault(capture_id, set()).add(source)
    for sources in labelled_by.values():
        summary.per_label_source.update(sources)
    summary.per_label_source["none"] = summary.items - len(labelled_by)
    return summary


def _json_object(store: ObjectStore, key: str) -> dict[str, Any]:
    try:
        value = json.loads(store.get_bytes(key))
    except ValueError as exc:
        raise ContractError(f"s3 object {key} is not JSON") from exc
    if not isinstance(value, dict):
        raise ContractError(f"s3 object {key} is not a JSON object")
    return value


def labelled_elsewhere(store: ObjectStore, layout: DatasetLayout, model: str) -> tuple[set[str], set[tuple[str, str]]]:
    """What is labelled outside a shard's own label columns: capture ids with a cloud label (human, teacher), and
    ``(device, request id)`` pairs with a device label record (an app's label that came after the upload)."""
    captures = {c for keys in cloud_labels(store, layout, model).values() for c in keys.values()}
    _, device_labels = find_captures(store, layout, model)
    requests = {(label.device, str(_json_object(store, label.key).get("request_id", ""))) for label in device_labels}
    return captures, requests


def iter_items(store: ObjectStore, layout: DatasetLayout, model: str, columns: Iterable[str],
               since: date | None = None) -> Iterator[tuple[ShardRef, dict[str, Any]]]:
    """Every captured item of ``model`` (``columns`` of it), shard by shard in key order."""
    shards, _ = find_captures(store, layout, model, since)
    for ref in shards:
        for row in read_shard(store, ref, columns).rows:
            yield ref, row


def write_label_records(store: ObjectStore, layout: DatasetLayout, records: list[LabelRecord]) -> list[str]:
    """Put each record at its key (:meth:`DatasetLayout.label_key`); returns the keys. Call it only once every
    record is built and checked: an import writes all its records or, on bad input, none."""
    keys = []
    for record in records:
        key = layout.label_key(record.source, record.model, record.capture_id, record.sample)
        store.put_bytes(key, record.model_dump_json(indent=1).encode(), content_type="application/json")
        keys.append(key)
    return keys


def build_snapshot(store: ObjectStore, layout: DatasetLayout, model: str, since: date | None = None) -> DatasetSnapshot:
    """Fix the field data of ``model`` (from day ``since`` on) as a snapshot: every capture shard, every device
    label record, and the cloud labels (human, teacher) of the items those shards hold, each by key and sha256;
    named by :func:`~edgeloop_core.contract.datasets.snapshot_digest`. Writes it under
    :meth:`DatasetLayout.snapshot_key` unless that snapshot exists already (the same digest: the same data), and
    returns it."""
    refs, device_labels = find_captures(store, layout, model, since)
    if not refs:
        raise ConfigError(f"no captures of {model!r}" + (f" since {since}" if since else "") +
                          f" under s3://{store.bucket}/{layout.captures_prefix()}: nothing to snapshot")
    shards, captured = [], set()
    for ref in refs:
        shard = read_shard(store, ref, ("capture_id", "label"))
        captured.update(row["capture_id"] for row in shard.rows)
        shards.append(SnapshotShard(key=ref.key, sha256=shard.sha256, size_bytes=shard.size_bytes, device=ref.device,
                                    day=ref.day, items=len(shard.rows),
                                    app_labels=sum(row["label"] is not None for row in shard.rows)))
    labels = []
    for device_label in device_labels:
        data = store.get_bytes(device_label.key)
        labels.append(SnapshotLabel(key=device_label.key, sha256=sha256_bytes(data), size_bytes=len(data),
                                    source="app", device=device_label.device))
    for source, keys in cloud_labels(store, layout, model).items():
        for key, capture_id in sorted(keys.items()):
            if capture_id in captured:
                data = store.get_bytes(key)
                labels.append(SnapshotLabel(key=key, sha256=sha256_bytes(data), size_bytes=len(data),
                                            source=source))  # type: ignore[arg-type]
    digest = snapshot_digest([(s.key, s.sha256) for s in shards], [(lab.key, lab.sha256) for lab in labels])
    sources = Counter({"app": sum(s.app_labels for s in shards)})
    sources.update(lab.source for lab in labels)
    snapshot = DatasetSnapshot(
        model=model, digest=digest, created_at=datetime.now(timezone.utc), since=since, shards=shards, labels=labels,
        devices=sorted({s.device for s in shards}), days=sorted({s.day for s in shards}),
        items=sum(s.items for s in shards), label_sources=dict(sorted(sources.items())))
    key = layout.snapshot_key(model, digest)
    if store.exists(key):
        return DatasetSnapshot.model_validate_json(store.get_bytes(key))
    store.put_bytes(key, snapshot.to_json(), content_type="application/json")
    return snapshot
