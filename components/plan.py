"""Should this run train at all? Scheduled retraining skips work when nothing changed since the channel's version."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from components.data import DatasetSplits
from edgeloop_core.contract import ArtifactLayout, Manifest
from edgeloop_core.errors import ObjectNotFound
from edgeloop_core.published import resolve_version
from edgeloop_core.store import ObjectStore


@dataclass(frozen=True)
class TrainingConfig:
    """The pipeline parameters that change what gets trained (recorded in the manifest's ``training``)."""

    arch: str
    epochs: int
    lr: float
    seed: int
    prune_constraint: str
    prune_keep_fraction: float
    prune_finetune_epochs: int
    qat_epochs: int
    tolerance_points: float
    calibration_samples: int = 512
    min_speedup: float = 1.0

    def to_json(self) -> str:
        """Sorted-key JSON."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Plan:
    """``decision`` is ``train`` or ``skip``; ``fingerprint`` identifies data + config."""

    decision: str
    fingerprint: str
    config: TrainingConfig

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read what :meth:`save` wrote."""
        raw = json.loads(Path(path).read_text())
        return cls(raw["decision"], raw["fingerprint"], TrainingConfig(**raw["config"]))


def fingerprint(data: DatasetSplits, config: TrainingConfig) -> str:
    """sha256 over the data's fingerprint and the training config."""
    return hashlib.sha256(f"{data.fingerprint()}:{config.to_json()}".encode()).hexdigest()


def decide(
    dataset_path: str, config: TrainingConfig, *, model_name: str, bucket: str, prefix: str, channel: str,
    s3_endpoint: str, force_retrain: bool,
) -> Plan:
    """``skip`` only when not forced and ``channel`` points at a version with the same fingerprint."""
    current = fingerprint(DatasetSplits.load(dataset_path), config)
    if force_retrain or not channel:
        return Plan("train", current, config)
    store = ObjectStore(bucket, endpoint_url=s3_endpoint or None)
    layout = ArtifactLayout(prefix)
    try:
        version = resolve_version(store, layout, model_name, channel)
        published = Manifest.from_json(store.get_bytes(layout.manifest_key(model_name, version)))
    except ObjectNotFound:
        return Plan("train", current, config)
    same = published.training.get("fingerprint") == current
    return Plan("skip" if same else "train", current, config)
