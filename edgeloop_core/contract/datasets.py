"""The cloud side of the data flywheel in the artifact contract: labels that do not come from a device, and dataset
snapshots (docs/flywheel.md)::

    <prefix>/labels/<source>/<model>/<capture-id>/<sample>.json   a label from the cloud (source human or teacher)
    <prefix>/datasets/<model>/snapshots/<digest>.json         a dataset snapshot, named by its content hash

Devices write only under their own ``captures/<device>/`` (:mod:`edgeloop_core.contract.captures`); nothing here
lies there, so no device identity can read or overwrite a person's or a teacher's labels. A cloud label is keyed by
the capture id it labels and the sample's index in the captured request (0 for the usual batch of one): labelling
the same sample again replaces its record (the latest word wins), and a repeated import writes the same keys.

Label sources, as a snapshot counts them:

* ``app``: ground truth an app sent to the device (the Label RPC), joined to its capture on the device (the shard's
  ``label`` columns) or uploaded as a device label record (``captures/<device>/labels/...``);
* ``human``: a person's annotation, imported from a labelling tool (Label Studio);
* ``teacher``: a pseudo-label from a teacher model (written by a later step; never used for a test slice).

A snapshot's digest is the sha256 of the canonical JSON of its sorted ``(key, sha256)`` pairs, shards first, label
records second (:func:`snapshot_digest`): the same data, the same digest, whoever builds it and when.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeloop_core.contract.manifest import NAME_PATTERN

LabelSource = Literal["app", "human", "teacher"]
LABEL_SOURCES: tuple[LabelSource, ...] = ("app", "human", "teacher")
CLOUD_LABEL_SOURCES: tuple[LabelSource, ...] = ("human", "teacher")
"""The sources whose records live under ``labels/`` (an app's labels come home with the device's captures)."""
CAPTURE_ID_PATTERN = r"^[0-9a-f]{16}-[0-9a-f]{12}$"
"""A capture id as the device makes it: 16 hex digits of Unix ns, a dash, 12 random hex digits."""
SNAPSHOT_SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelRecord(_Strict):
    """``labels/<source>/<model>/<capture-id>/<sample>.json``: the right answer for one captured sample, from the
    cloud."""

    capture_id: str = Field(pattern=CAPTURE_ID_PATTERN)
    sample: int = Field(0, ge=0, description="the sample's index in the captured request's batch")
    model: str = Field(pattern=NAME_PATTERN)
    source: LabelSource
    label: Any = Field(description="the answer as JSON; a classifier's is its class index (as the Label RPC sends)")
    class_name: str | None = Field(None, description="a classifier's class name, as the manifest's labels say it")
    time: datetime = Field(description="when the label was given (the annotation's time), UTC")
    by: str = Field("", description="who gave it: an annotator's id, a teacher model's name/version")
    origin: str = Field("", description="where it came from, e.g. `label-studio task 12, annotation 40`")
    device_id: str = Field("", description="the device that captured the item")
    request_id: str = Field("", description="the OIP request id of the captured item")


class SnapshotFile(_Strict):
    """One object a snapshot holds."""

    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class SnapshotShard(SnapshotFile):
    """A capture shard in a snapshot, with what it holds."""

    device: str
    day: date
    items: int = Field(ge=0)
    app_labels: int = Field(0, ge=0, description="items labelled on the device (the shard's label columns)")


class SnapshotLabel(SnapshotFile):
    """A label record in a snapshot (a cloud label, or a device label record)."""

    source: LabelSource
    device: str = Field("", description="the device, for a device label record")


class DatasetSnapshot(_Strict):
    """``datasets/<model>/snapshots/<digest>.json``: the field data a training run may use, fixed by content."""

    schema_version: int = SNAPSHOT_SCHEMA_VERSION
    model: str = Field(pattern=NAME_PATTERN)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 over the sorted (key, sha256) pairs")
    created_at: datetime
    since: date | None = Field(None, description="the first capture day selected (none: all)")
    shards: list[SnapshotShard]
    labels: list[SnapshotLabel]
    devices: list[str] = Field(description="devices whose captures it holds, sorted")
    days: list[date] = Field(description="capture days it holds, sorted")
    items: int = Field(ge=0, description="captured items in its shards")
    label_sources: dict[str, int] = Field(
        description="labels per source (app: joined on the device plus device records; human; teacher)")

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, UTF-8)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()


def snapshot_digest(shards: list[tuple[str, str]], labels: list[tuple[str, str]]) -> str:
    """The content hash of a snapshot: sha256 of the canonical JSON ``{"shards": [...], "labels": [...]}`` of
    sorted ``(key, sha256)`` pairs. Order of the inputs does not matter; any changed byte of any object does."""
    canonical = json.dumps({"shards": sorted(map(list, shards)), "labels": sorted(map(list, labels))},
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class DatasetLayout:
    """Builds the keys of cloud labels and snapshots under an optional ``prefix`` (as
    :class:`~edgeloop_core.contract.layout.ArtifactLayout`)."""

    prefix: str = ""

    def _root(self) -> str:
        cleaned = self.prefix.strip("/")
        return f"{cleaned}/" if cleaned else ""

    def captures_prefix(self) -> str:
        """Where every device's captures lie (``captures/``; one folder per device below it)."""
        return f"{self._root()}captures/"

    def labels_prefix(self, source: LabelSource, model: str) -> str:
        """Every cloud label of ``source`` for ``model`` (ends with ``/``)."""
        if source not in CLOUD_LABEL_SOURCES:
            raise ValueError(f"label source {source!r} is not kept in the cloud's labels/: {CLOUD_LABEL_SOURCES}")
        return f"{self._root()}labels/{source}/{model}/"

    def label_key(self, source: LabelSource, model: str, capture_id: str, sample: int = 0) -> str:
        """The key of the cloud label of ``source`` for one captured sample (``sample``: its index in the batch)."""
        return f"{self.labels_prefix(source, model)}{capture_id}/{sample}.json"

    def snapshots_prefix(self, model: str) -> str:
        """Every snapshot of ``model`` (ends with ``/``)."""
        return f"{self._root()}datasets/{model}/snapshots/"

    def snapshot_key(self, model: str, digest: str) -> str:
        """The key of a snapshot, named by its digest."""
        return f"{self.snapshots_prefix(model)}{digest}.json"
