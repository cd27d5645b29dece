"""Should this run train at all? Scheduled retraining skips work when nothing changed since the deployed version, and
with field data it trains only when the field says so: enough newly labelled samples, or drift at the hub.

The rules, in order (the first that applies decides; :attr:`Plan.reason` says which, in one line):

1. ``force_retrain``, no channel, or no version on the deployed channel yet: ``train``;
2. the data (field items mixed in) and the config are those of the deployed version (same fingerprint): ``skip``;
3. the curated data or the config changed (the *base* fingerprint differs): ``train``;
4. with field data, ``train`` when at least ``min_new_labels`` app/human-labelled samples are new since the deployed
   version's snapshot, or they are at least ``min_new_share`` of all labelled ones, or a device's drift (the hub's
   Jensen-Shannon max for this model) passes ``drift_threshold``; else ``skip``. Without field data here but with
   field data in the deployed version: ``train`` (what the version learned from changes).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.data import DatasetSplits
from edgeloop_core.contract import ArtifactLayout, Manifest
from edgeloop_core.contract.datasets import DatasetLayout, DatasetSnapshot
from edgeloop_core.errors import ConfigError, ContractError, EdgeloopError, ObjectNotFound
from edgeloop_core.published import resolve_version
from edgeloop_core.store import ObjectStore

HUB_TOKEN_ENV = "HUB_READ_TOKEN"
"""The environment variable with a reader token of the telemetry hub (the drift trigger)."""
HUB_CA_ENV = "HUB_CA_FILE"
"""Optional: the CA (PEM) of the hub's TLS certificate; set, the plan talks TLS to the hub."""
LABELLED_SOURCES = ("app", "human")
"""Label sources that count as new field knowledge (a teacher's pseudo-labels do not)."""
_NEW_CONFIG_DEFAULTS: dict[str, Any] = {"warm_start": False}
"""Config fields added after the first release: left out of the fingerprint at their default, so a run with the
defaults keeps the fingerprint (and the skip) of the versions published before them."""


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
    warm_start: bool = False
    """Start from the deployed version's training checkpoint instead of from scratch."""

    def to_json(self) -> str:
        """Sorted-key JSON (fields added later are left out at their default: see ``_NEW_CONFIG_DEFAULTS``)."""
        values = {k: v for k, v in asdict(self).items()
                  if k not in _NEW_CONFIG_DEFAULTS or v != _NEW_CONFIG_DEFAULTS[k]}
        return json.dumps(values, sort_keys=True)


@dataclass(frozen=True)
class FieldTriggers:
    """When field data makes a run train (0 turns a trigger off; ``min_new_labels`` 0 trains on any field data)."""

    min_new_labels: int = 50
    min_new_share: float = 0.0
    drift_threshold: float = 0.0
    hub_address: str = ""


@dataclass(frozen=True)
class Plan:
    """``decision`` is ``train`` or ``skip``; ``fingerprint`` identifies data + config, ``base_fingerprint`` the
    curated data (before field items) + config; ``reason`` says why, in one line."""

    decision: str
    fingerprint: str
    config: TrainingConfig
    reason: str = ""
    base_fingerprint: str = ""
    field: dict[str, Any] = field(default_factory=dict)
    """What the field triggers measured: new labelled samples, their share, drift (empty without field data)."""

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read what :meth:`save` wrote (plan files written before ``reason`` existed too)."""
        raw = json.loads(Path(path).read_text())
        return cls(raw["decision"], raw["fingerprint"], TrainingConfig(**raw["config"]), raw.get("reason", ""),
                   raw.get("base_fingerprint", ""), raw.get("field", {}))


def fingerprint(data: DatasetSplits, config: TrainingConfig) -> str:
    """sha256 over the data's fingerprint and the training config."""
    return hashlib.sha256(f"{data.fingerprint()}:{config.to_json()}".encode()).hexdigest()


@dataclass(frozen=True)
class Deployed:
    """The version on the deployed channel and its manifest (parsed only: the plan decides, it uses no file)."""

    channel: str
    version: str
    manifest: Manifest


def deployed_version(store: ObjectStore, layout: ArtifactLayout, model_name: str, channel: str) -> Deployed | None:
    """The deployed channel's version, or None when the channel or the version's manifest is not there."""
    try:
        version = resolve_version(store, layout, model_name, channel)
        manifest = Manifest.from_json(store.get_bytes(layout.manifest_key(model_name, version)))
    except ObjectNotFound:
        return None
    return Deployed(channel, version, manifest)


def decide(
    dataset_path: str, config: TrainingConfig, *, model_name: str, bucket: str, prefix: str, channel: str,
    s3_endpoint: str, force_retrain: bool, base_dataset_path: str | None = None, deployed_channel: str = "",
    triggers: FieldTriggers | None = None,
) -> Plan:
    """The plan (module docstring: the rules). ``dataset_path`` is what trains (field items mixed in),
    ``base_dataset_path`` the curated data before them (default: the same); ``deployed_channel`` (empty:
    ``channel``) names the version now deployed."""
    data = DatasetSplits.load(dataset_path)
    current = fingerprint(data, config)
    base = current if base_dataset_path in (None, dataset_path) else fingerprint(
        DatasetSplits.load(base_dataset_path), config)
    deployed_channel = deployed_channel or channel
    if force_retrain:
        return Plan("train", current, config, "forced (force_retrain=true)", base)
    if not deployed_channel:
        return Plan("train", current, config, "no channel to compare with: always trains", base)
    store = ObjectStore(bucket, endpoint_url=s3_endpoint or None)
    deployed = deployed_version(store, ArtifactLayout(prefix), model_name, deployed_channel)
    if deployed is None:
        return Plan("train", current, config, f"no version on channel {deployed_channel!r} of {model_name!r} yet",
                    base)
    training = deployed.manifest.training
    if training.get("fingerprint") == current:
        return Plan("skip", current, config,
                    f"same data and config as the deployed {deployed.version}: nothing to learn", base)
    lineage = data.extra.get("field") or {}
    if training.get("base_fingerprint", training.get("fingerprint")) != base:
        reason, measured = f"curated data or config changed since the deployed {deployed.version}", {}
        if lineage.get("snapshot"):  # say what the field brings too: the run learns from both
            _, field_reason, measured = field_decision(store, DatasetLayout(prefix), model_name, lineage, deployed,
                                                       triggers or FieldTriggers())
            reason += f"; field: {field_reason}"
        return Plan("train", current, config, reason, base, measured)
    if not lineage.get("snapshot"):
        return Plan("train", current, config, f"the deployed {deployed.version} learned from field data, this run "
                                              f"has none", base)
    decision, reason, measured = field_decision(store, DatasetLayout(prefix), model_name, lineage, deployed,
                                                triggers or FieldTriggers())
    return Plan(decision, current, config, reason, base, measured)


def field_decision(store: ObjectStore, layout: DatasetLayout, model_name: str, lineage: dict[str, Any],
                   deployed: Deployed, triggers: FieldTriggers) -> tuple[str, str, dict[str, Any]]:
    """``(decision, reason, measured)`` from the field triggers: new labelled samples since the deployed version's
    snapshot (count and share) and the hub's drift."""
    current = load_snapshot(store, layout, model_name, str(lineage["snapshot"]))
    old_digest = str((deployed.manifest.training.get("field") or {}).get("snapshot") or "")
    old: DatasetSnapshot | None = None
    note = ""
    if old_digest:
        try:
            old = load_snapshot(store, layout, model_name, old_digest)
        except ObjectNotFound:
            note = f" (the deployed snapshot {old_digest[:12]}… is gone: every label counts as new)"
    new, total = new_labelled_samples(current, old)
    share = new / total if total else 0.0
    since = f"since {deployed.version}'s snapshot" if old is not None else f"({deployed.version} had no field data)"
    fired = []
    if new >= triggers.min_new_labels:
        fired.append(f"{new} new labelled field samples {since} (>= {triggers.min_new_labels})")
    if triggers.min_new_share > 0 and share >= triggers.min_new_share:
        fired.append(f"new labels are {share:.0%} of {total} (>= {triggers.min_new_share:.0%})")
    measured: dict[str, Any] = {"new_labelled": new, "labelled": total, "new_share": share}
    drift_text = ""
    if triggers.drift_threshold > 0:
        drift, where, problem = fleet_drift(triggers.hub_address, model_name)
        measured["drift"] = drift
        if problem:
            drift_text = f"; drift not checked: {problem}"
        elif drift is not None and drift > triggers.drift_threshold:
            fired.append(f"drift {drift:.2f} on {where} (> {triggers.drift_threshold:.2f})")
        else:
            drift_text = f"; drift {'none reported' if drift is None else f'{drift:.2f}'} " \
                         f"(<= {triggers.drift_threshold:.2f})"
    if fired:
        return "train", "; ".join(fired) + drift_text + note, measured
    return "skip", (f"only {new} new labelled field samples {since} (< {triggers.min_new_labels}"
                    + (f", share {share:.0%} < {triggers.min_new_share:.0%}" if triggers.min_new_share > 0 else "")
                    + ")" + drift_text + note), measured


def load_snapshot(store: ObjectStore, layout: DatasetLayout, model_name: str, digest: str) -> DatasetSnapshot:
    """The stored snapshot ``digest`` of ``model_name`` (:class:`ObjectNotFound` when gone, :class:`ContractError`
    when it is not a snapshot or not the one asked for)."""
    data = store.get_bytes(layout.snapshot_key(model_name, digest))
    try:
        snapshot = DatasetSnapshot.model_validate_json(data)
    except ValueError as exc:
        raise ContractError(f"s3 object {layout.snapshot_key(model_name, digest)} is not a dataset snapshot") from exc
    if snapshot.digest != digest or snapshot.model != model_name:
        raise ContractError(f"snapshot {digest[:12]}… of {model_name!r} names {snapshot.model}/{snapshot.digest}")
    return snapshot


def new_labelled_samples(current: DatasetSnapshot, old: DatasetSnapshot | None) -> tuple[int, int]:
    """``(new, total)`` app/human labels of ``current``, ``new`` those ``old`` did not hold: a shard's app labels
    count as new when ``old`` lacks that shard (shards are immutable, each key new items), a label record when
    ``old`` lacks its key with that content (a relabelled sample is new knowledge too)."""
    old_shards = {s.key for s in old.shards} if old is not None else set()
    old_labels = {(lab.key, lab.sha256) for lab in old.labels} if old is not None else set()
    total = new = 0
    for shard in current.shards:
        total += shard.app_labels
        new += shard.app_labels if shard.key not in old_shards else 0
    for label in current.labels:
        if label.source in LABELLED_SOURCES:
            total += 1
            new += (label.key, label.sha256) not in old_labels
    return new, total


def fleet_drift(hub_address: str, model_name: str) -> tuple[float | None, str, str]:
    """``(largest drift, device, problem)``: the largest Jensen-Shannon max any device of ``model_name`` reports
    at the hub (reader token from ``HUB_READ_TOKEN``; TLS when ``HUB_CA_FILE`` is set). ``problem`` is a line saying
    why the hub could not be asked (then the drift is None); the drift is None without a problem when no device
    reported any yet."""
    import asyncio

    from edgeloop_core.tls import HubTls
    from telemetry_hub.server import fleet_pages

    token = os.environ.get(HUB_TOKEN_ENV, "")
    if not hub_address or not token:
        return None, "", f"no hub_address or no {HUB_TOKEN_ENV}"
    ca = os.environ.get(HUB_CA_ENV, "")

    async def largest() -> tuple[float | None, str]:
        best: tuple[float | None, str] = (None, "")
        async for reply in fleet_pages(hub_address, token, HubTls(Path(ca)) if ca else None, model_name=model_name):
            for device in reply.devices:
                drift = _drift_max(device.drift_json)
                if drift is not None and (best[0] is None or drift > best[0]):
                    best = (drift, device.device_id)
        return best

    try:
        drift, where = asyncio.run(largest())
    except EdgeloopError as exc:
        return None, "", str(exc)
    return drift, where, ""


def _drift_max(text: str) -> float | None:
    """The ``max`` of a device's ``drift_json``; None when empty or unreadable."""
    try:
        value = json.loads(text).get("max") if text else None
        return float(value) if value is not None else None
    except (ValueError, AttributeError, TypeError):
        return None


def verified_deployed(store: ObjectStore, layout: ArtifactLayout, model_name: str, channel: str) -> Deployed:
    """The deployed channel's version with its signed pointer and manifest verified (the signature check of
    :func:`edgeloop_core.published.verify_published`, against :func:`components.deployed.trusted_keys`; the files a
    caller downloads it checks by their sha256). No version there is one :class:`ConfigError` line."""
    from components.deployed import trusted_keys
    from edgeloop_core.published import read_manifest

    trusted = trusted_keys()
    try:
        version = resolve_version(store, layout, model_name, channel, trusted)
    except ObjectNotFound:
        raise ConfigError(f"no deployed version: channel {channel!r} of {model_name!r} does not exist in "
                          f"s3://{store.bucket}; publish a version first or train from scratch") from None
    return Deployed(channel, version, read_manifest(store, layout, model_name, version, trusted))
