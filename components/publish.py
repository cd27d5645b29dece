"""Publish an immutable, signed version to S3: files first, the signed manifest last, then the channel pointer."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from components.data import DatasetSplits
from components.evaluate import Evaluation, enforce_gate
from components.export import INPUT_NAME, OUTPUT_NAME, VariantInfo
from edgeloop_core.contract import (
    ArtifactLayout,
    FileRef,
    Manifest,
    Task,
    TensorSpec,
    Validation,
    Variant,
    check_name,
    parse_pointer,
    sha256_file,
    sign_manifest,
    sign_pointer,
)
from edgeloop_core.contract.captures import CapturePolicy
from edgeloop_core.contract.channel import DEFAULT_TTL, ChannelPointer
from edgeloop_core.errors import (
    ConfigError,
    ManifestInvalid,
    ObjectNotFound,
    SignatureInvalid,
    StoreError,
    VersionExists,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from components.plan import Plan
    from edgeloop_core.drift import FieldBaseline
    from edgeloop_core.store import ObjectStore

RESIGN_WINDOW = DEFAULT_TTL / 3
"""A channel pointer that expires within this (30 days of the 90-day TTL) is re-signed by a scheduled run that has
nothing to train (:func:`resign_channels`), so a model that does not change keeps its channels alive."""

VALIDATION_FILE = "validation.npz"
REPORT_FILE = "report.html"


def new_version(now: datetime | None = None) -> str:
    """A fresh, sortable version name: ``v<UTC date>-<UTC time>-<4 hex>``."""
    now = now or datetime.now(timezone.utc)
    return f"v{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def write_validation_set(data: DatasetSplits, path: str | Path) -> Path:
    """The held-out test split as ``inputs`` (float32, preprocessed) and ``labels`` (int64); for detection data,
    ``inputs`` and ``coco``: the test boxes as COCO-format labels, JSON text in a 0-d unicode array (what the
    device's ``detection_map50`` reads)."""
    if data.task == "detection":
        import json

        from components.detection_data import table_to_coco

        coco = table_to_coco(data.y_test, int(data.x_test.shape[-1]), data.labels)
        with open(path, "wb") as fh:
            np.savez(fh, inputs=data.x_test.astype(np.float32), coco=np.array(json.dumps(coco)))
        return Path(path)
    with open(path, "wb") as fh:
        np.savez(fh, inputs=data.x_test.astype(np.float32), labels=data.y_test.astype(np.int64))
    return Path(path)


def _detection_contract(staging: Path, infos: Sequence[VariantInfo],
                        data: DatasetSplits) -> tuple[list[TensorSpec], Task]:
    """A detector's outputs as exported (``[-1, 4 + classes, anchors]``) and its task (YOLOv8 layout, with the box
    and score slices validation compares on their own)."""
    from components.detection_export import output_spec
    from components.detector import detection_task

    output = output_spec(staging / infos[0].file)
    return [output], detection_task(data.num_classes, output.name)


BASELINE_SAMPLES = 2000
"""Training samples the field baseline is measured on, at most (a random, seeded subset of a larger set)."""


def field_baseline(staging: Path, infos: Sequence[VariantInfo], data: DatasetSplits, task: Task) -> FieldBaseline:
    """The training data's field statistics through the FP32 dense model (:mod:`edgeloop_core.drift`): the baseline
    a device's served inputs and outputs are compared with for drift."""
    import onnxruntime as ort

    from edgeloop_core.drift import build_baseline

    reference = next((i for i in infos if i.name == "fp32-dense"), infos[0])
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(data.x_train))[:BASELINE_SAMPLES]
    inputs = {INPUT_NAME: data.x_train[np.sort(pick)].astype(np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(staging / reference.file), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, inputs), strict=True))
    return build_baseline(inputs, outputs, task, num_classes=data.num_classes if task.kind != "detection" else None)


def _file_ref(directory: Path, name: str) -> dict[str, Any]:
    digest, size = sha256_file(directory / name)
    return {"file": name, "sha256": digest, "size_bytes": size}


def build_manifest(
    *,
    name: str,
    version: str,
    staging: Path,
    data: DatasetSplits,
    infos: Sequence[VariantInfo],
    evaluation: Evaluation,
    tolerance_points: float,
    pipeline_run: dict[str, Any],
    training: dict[str, Any],
) -> Manifest:
    """The unsigned manifest of the files in ``staging`` (variants, validation set, report)."""
    variants = [
        Variant(
            **_file_ref(staging, info.file),
            name=info.name,
            precision=info.precision,  # type: ignore[arg-type]
            quantization=info.quantization,  # type: ignore[arg-type]
            backends=list(info.backends),  # type: ignore[arg-type]
            pruned=info.pruned,
            accuracy=evaluation.variant(info.name).accuracy,
            params=info.params,
            flops=info.flops,
            preferred=evaluation.variant(info.name).preferred,
            speedup=evaluation.variant(info.name).speedup,
        )
        for info in infos
    ]
    report = FileRef(**_file_ref(staging, REPORT_FILE)) if (staging / REPORT_FILE).exists() else None
    outputs = [TensorSpec(name=OUTPUT_NAME, datatype="FP32", shape=[-1, data.num_classes])]
    task, metric = Task(), "top1_accuracy"
    if data.task == "detection":  # COCO mAP@0.5 against the boxes in validation.npz, with its negative control
        (outputs, task), metric = _detection_contract(staging, infos, data), "detection_map50"
    return Manifest(
        name=name,
        version=version,
        created_at=datetime.now(timezone.utc),
        pipeline_run=pipeline_run,
        training=training,
        inputs=[TensorSpec(name=INPUT_NAME, datatype="FP32", shape=[-1, *data.input_shape])],
        outputs=outputs,
        task=task,
        preprocessing=data.preprocessing,
        labels=data.labels,
        variants=variants,
        validation=Validation(
            **_file_ref(staging, VALIDATION_FILE),
            metric=metric,
            num_samples=len(data.y_test),
            reference={v.name: v.accuracy for v in evaluation.variants},
            tolerance=tolerance_points / 100.0,
            control=evaluation.control,
        ),
        report=report,
        field_baseline=field_baseline(staging, infos, data, task),
    )


def publish_version(
    store: ObjectStore,
    manifest: Manifest,
    staging: str | Path,
    signing_key: Ed25519PrivateKey,
    *,
    layout: ArtifactLayout,
    channel: str | None = None,
    cloud_files: dict[str, Path] | None = None,
) -> Manifest:
    """Upload every file the manifest names from ``staging``, then the signed manifest, then move ``channel``.

    ``cloud_files`` (S3 key → local file) are uploaded with them, before the manifest: files that only the cloud
    reads (the training checkpoint), recorded in the manifest's ``training`` rather than its files, so devices never
    download them. Refuses (:class:`VersionExists`) when anything already exists under the version's prefix; the
    manifest itself is written with ``If-None-Match: *`` so two racing publishers cannot both win. If an upload
    fails, the files already uploaded are removed: without a manifest the version never existed.
    """
    staging = Path(staging)
    prefix = layout.version_prefix(manifest.name, manifest.version)
    if store.list_keys(prefix):
        raise VersionExists(
            f"s3://{store.bucket}/{prefix} already has objects: versions are immutable, publish a new version"
        )
    signed = sign_manifest(manifest, signing_key)
    uploaded: list[str] = []
    try:
        for ref in signed.files():
            key = layout.file_key(signed.name, signed.version, ref.file)
            store.put_file(key, staging / ref.file)
            uploaded.append(key)
        for key, path in (cloud_files or {}).items():
            store.put_file(key, path)
            uploaded.append(key)
        store.put_bytes(
            layout.manifest_key(signed.name, signed.version),
            signed.to_json().encode(),
            content_type="application/json",
            if_absent=True,
        )
    except StoreError:
        for key in uploaded:
            try:
                store.client.delete_object(Bucket=store.bucket, Key=key)
            except Exception:  # noqa: BLE001 - best-effort cleanup, the original error matters
                pass
        raise
    if channel:
        move_channel(store, layout, signed.name, channel, signed.version, signing_key)
    return signed


KEEP_CAPTURE = "keep"
"""``capture`` of :func:`move_channel`: carry the current pointer's capture policy over (only from a pointer this
signing key signed: a planted policy is never laundered into a signed one)."""


def move_channel(store: ObjectStore, layout: ArtifactLayout, name: str, channel: str, version: str,
                 signing_key: Ed25519PrivateKey, *, ttl: timedelta = DEFAULT_TTL,
                 capture: CapturePolicy | Literal["keep"] | None = KEEP_CAPTURE) -> ChannelPointer:
    """Point ``name``'s ``channel`` at ``version`` with a signed pointer whose sequence is above the current one's.

    The version must be complete (its manifest exists). The sequence is the larger of the old pointer's + 1 and
    the current time in milliseconds, so it grows even when the old pointer is unreadable. ``capture`` is the
    field-capture policy the pointer carries for the devices that follow it (docs/capture.md): ``"keep"`` (the
    default) keeps the current pointer's, ``None`` carries none.
    """
    pointer = _next_pointer(store, layout, name, channel, version, signing_key, ttl, capture)
    store.put_bytes(layout.channel_key(name, channel), pointer.to_json(), content_type="application/json")
    return pointer


def set_channel_capture(store: ObjectStore, layout: ArtifactLayout, name: str, channel: str,
                        signing_key: Ed25519PrivateKey, capture: CapturePolicy | None, *,
                        ttl: timedelta = DEFAULT_TTL) -> ChannelPointer:
    """Re-sign ``name``'s ``channel`` at the version it points to now with the field-capture policy ``capture``
    (``None``: none), a higher sequence and a fresh ``ttl``; devices that follow the channel apply it within their
    poll interval, without a restart. Only a pointer this key signed is re-signed (else :class:`SignatureInvalid`),
    and only if nobody moved the channel meanwhile (else :class:`ConfigError`: run it again)."""
    check_name(name, "model name")
    check_name(channel, "channel")
    key = layout.channel_key(name, channel)
    data, etag = store.get_tagged(key)
    current = _own_pointer(data, name, channel, signing_key)
    if current is None:
        raise SignatureInvalid(f"channel {channel!r} of {name!r} is not a pointer this signing key signed: promote a "
                               f"version to it first (edgeloop pipeline promote)")
    fresh = _next_pointer(store, layout, name, channel, current.version, signing_key, ttl, capture)
    if not store.replace_if_unchanged(key, fresh.to_json(), etag, content_type="application/json"):
        raise ConfigError(f"channel {channel!r} of {name!r} moved while its capture policy was set: run it again")
    return fresh


def _next_pointer(store: ObjectStore, layout: ArtifactLayout, name: str, channel: str, version: str,
                  signing_key: Ed25519PrivateKey, ttl: timedelta,
                  capture: CapturePolicy | Literal["keep"] | None = KEEP_CAPTURE) -> ChannelPointer:
    """The signed pointer :func:`move_channel` writes (checked names, complete version, higher sequence, the
    capture policy as :func:`move_channel` says)."""
    check_name(name, "model name")
    check_name(channel, "channel")
    check_name(version, "version")
    if not store.exists(layout.manifest_key(name, version)):
        raise ObjectNotFound(f"{name}/{version} has no manifest in s3://{store.bucket}: publish it first")
    key = layout.channel_key(name, channel)
    previous, data = 0, b""
    try:
        data = store.get_bytes(key)
        previous = parse_pointer(data, name, channel).sequence
    except (ObjectNotFound, ManifestInvalid):
        pass
    if capture == KEEP_CAPTURE:
        own = _own_pointer(data, name, channel, signing_key) if data else None
        capture = own.capture if own is not None else None
    sequence = max(previous + 1, int(time.time() * 1000))
    return sign_pointer(name, channel, version, sequence, signing_key, ttl=ttl,
                        capture=capture if isinstance(capture, CapturePolicy) else None)


def channel_pointers(store: ObjectStore, layout: ArtifactLayout, name: str) -> list[ChannelPointer | str]:
    """Every channel pointer of model ``name``, sorted by channel; one that cannot be parsed is given as its
    one-line reason instead (nothing is verified here: :func:`resign_channels` checks signatures)."""
    check_name(name, "model name")
    prefix = layout.channel_key(name, "x")[: -len("x.json")]
    found: list[ChannelPointer | str] = []
    for key in sorted(store.list_keys(prefix)):
        channel = key[len(prefix):].removesuffix(".json")
        try:
            found.append(parse_pointer(store.get_bytes(key), name, check_name(channel, "channel")))
        except (ManifestInvalid, ConfigError, ObjectNotFound) as exc:
            found.append(str(exc))
    return found


def resign_channels(store: ObjectStore, layout: ArtifactLayout, name: str, signing_key: Ed25519PrivateKey, *,
                    within: timedelta = RESIGN_WINDOW, ttl: timedelta = DEFAULT_TTL,
                    now: datetime | None = None) -> list[ChannelPointer]:
    """Re-sign every channel pointer of ``name`` that expires within ``within`` of ``now`` (expired ones included):
    same version, higher sequence, a fresh ``ttl``, as :func:`move_channel` (``edgeloop pipeline promote``) signs
    it. Returns the new pointers.

    Only a pointer this key signed is re-signed: one that is unsigned, malformed or signed by another key is left
    as it is, so a planted pointer is never laundered into a valid one. The write is conditional on the pointer
    being the object read (``If-Match``): a channel that someone moved meanwhile keeps their newer pointer.
    """
    now = now or datetime.now(timezone.utc)
    resigned = []
    prefix = layout.channel_key(name, "x")[: -len("x.json")]
    for key in sorted(store.list_keys(prefix)):
        data, etag = store.get_tagged(key)
        pointer = _own_pointer(data, name, key[len(prefix):].removesuffix(".json"), signing_key)
        if pointer is None or _aware(pointer.expires) - now > within:
            continue
        fresh = _next_pointer(store, layout, name, pointer.channel, pointer.version, signing_key, ttl, pointer.capture)
        if store.replace_if_unchanged(key, fresh.to_json(), etag,
                                      content_type="application/json"):  # else the channel moved: theirs stays
            resigned.append(fresh)
    return resigned


def _own_pointer(data: bytes, name: str, channel: str, signing_key: Ed25519PrivateKey) -> ChannelPointer | None:
    """The pointer in ``data`` if it parses for ``name``/``channel`` and ``signing_key`` signed it, else None."""
    from edgeloop_core.contract.signing import check_signature

    try:
        pointer = parse_pointer(data, name, check_name(channel, "channel"))
        check_signature(pointer.signature, pointer.canonical_bytes(), signing_key.public_key(),
                        f"channel {channel!r} of {name!r}")
    except (ManifestInvalid, ConfigError, SignatureInvalid):
        return None
    return pointer


def _aware(moment: datetime) -> datetime:
    """``moment`` with UTC assumed when it has no time zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def resign_from_env(*, model_name: str, bucket: str, prefix: str, s3_endpoint: str,
                    signing_key_path: str | None = None) -> list[ChannelPointer]:
    """The pipeline's re-sign step: :func:`resign_channels` with the publish step's signing key
    (``EDGELOOP_SIGNING_KEY[_FILE]``) and S3 credentials from boto3's usual chain."""
    from edgeloop_core.contract import load_signing_key
    from edgeloop_core.store import ObjectStore

    store = ObjectStore(bucket, endpoint_url=s3_endpoint or None)
    return resign_channels(store, ArtifactLayout(prefix), model_name, load_signing_key(signing_key_path))


def publish_from_paths(
    *,
    dataset_path: str,
    onnx_dir: str,
    evaluation_path: str,
    report_path: str,
    model_name: str,
    bucket: str,
    prefix: str,
    channel: str,
    s3_endpoint: str,
    tolerance_points: float,
    plan_path: str,
    manifest_out: str,
    manifest_meta: dict[str, Any] | None = None,
    signing_key_path: str | None = None,
    dense_model_dir: str | None = None,
) -> str:
    """The publish step over the artifacts earlier steps wrote; returns the new version.

    With ``dense_model_dir`` (the train step's FP32 model) the version keeps its training checkpoint for later warm
    starts (:func:`training_record`). The signing key comes from the environment (``EDGELOOP_SIGNING_KEY`` or
    ``EDGELOOP_SIGNING_KEY_FILE``); S3 credentials from boto3's usual chain.
    """
    import os
    import shutil
    import tempfile

    from components.export import load_variant_infos
    from components.plan import Plan
    from components.train import CHECKPOINT_FILE
    from edgeloop_core.contract import load_signing_key
    from edgeloop_core.store import ObjectStore

    signing_key = load_signing_key(signing_key_path)
    data = DatasetSplits.load(dataset_path)
    evaluation = Evaluation.load(evaluation_path)
    enforce_gate(evaluation)  # the gate step ran before; a caller that skipped it still publishes nothing that failed
    infos = load_variant_infos(onnx_dir)
    plan = Plan.load(plan_path)
    version = new_version()
    layout = ArtifactLayout(prefix)
    with tempfile.TemporaryDirectory(prefix="edgeloop-publish-") as tmp:
        staging = Path(tmp)
        training, cloud_files = training_record(plan, data, dense_model_dir, staging / "cloud",
                                                layout.file_key(model_name, version, CHECKPOINT_FILE))
        for info in infos:
            shutil.copyfile(Path(onnx_dir) / info.file, staging / info.file)
        write_validation_set(data, staging / VALIDATION_FILE)
        shutil.copyfile(report_path, staging / REPORT_FILE)
        manifest = build_manifest(
            name=model_name,
            version=version,
            staging=staging,
            data=data,
            infos=infos,
            evaluation=evaluation,
            tolerance_points=tolerance_points,
            pipeline_run={
                "pipeline": "edgeloop-retraining",
                "run_id": os.environ.get("KFP_RUN_ID", ""),
                "data_uri": data.source,
            },
            training=training,
        )
        store = ObjectStore(bucket, endpoint_url=s3_endpoint or None)
        signed = publish_version(store, manifest, staging, signing_key, layout=layout, channel=channel or None,
                                 cloud_files=cloud_files)
    Path(manifest_out).write_text(signed.to_json())
    if manifest_meta is not None:
        manifest_meta.update({
            "uri": f"s3://{bucket}/{ArtifactLayout(prefix).manifest_key(model_name, version)}",
            "version": version,
        })
    return version


WARM_START_FILE = "warm_start.json"
"""Written by the train step beside its model when it started from the deployed version: ``{"version",
"checkpoint_sha256"}`` (what ``training.warm_start`` records)."""
LINEAGE_ID_LISTS = ("ids", "device_of_row")
"""Per-sample lists in the dataset's field lineage: the manifest keeps only their sha256 (``ids_sha256``)."""


def field_lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    """The dataset's ``extra["field"]`` as the manifest records it: the per-sample lists of ``train`` and ``slice``
    replaced by ``ids_sha256``, the sha256 of the compact JSON of the id list (``json.dumps(ids,
    separators=(",", ":"))``), so a snapshot's split can be checked against a version without the manifest
    growing with every sample."""
    import hashlib
    import json

    record = {k: v for k, v in lineage.items() if k not in ("train", "slice")}
    for part in ("train", "slice"):
        if isinstance(lineage.get(part), dict):
            side = {k: v for k, v in lineage[part].items() if k not in LINEAGE_ID_LISTS}
            ids = lineage[part].get("ids", [])
            side["ids_sha256"] = hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()
            record[part] = side
    return record


def training_record(plan: Plan, data: DatasetSplits, dense_model_dir: str | None, workdir: Path,
                    checkpoint_key: str) -> tuple[dict[str, Any], dict[str, Path]]:
    """``(training, cloud files)``: the manifest's ``training`` (fingerprints, config, the plan's decision and
    reason, the field lineage, the warm start's base version, the checkpoint's key, sha256 and size) and the S3 key
    → local file of the training checkpoint (none without ``dense_model_dir``)."""
    import json

    from components.models import write_training_checkpoint

    training: dict[str, Any] = {"fingerprint": plan.fingerprint, "config": asdict(plan.config)}
    if plan.base_fingerprint:
        training["base_fingerprint"] = plan.base_fingerprint
    if plan.reason:
        training["plan"] = {"decision": plan.decision, "reason": plan.reason}
    if data.extra.get("field"):
        training["field"] = field_lineage(data.extra["field"])
    if not dense_model_dir:
        return training, {}
    warm = Path(dense_model_dir) / WARM_START_FILE
    if warm.exists():
        training["warm_start"] = json.loads(warm.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = write_training_checkpoint(dense_model_dir, workdir / "checkpoint.pt")
    digest, size = sha256_file(checkpoint)
    training["checkpoint"] = {"key": checkpoint_key, "sha256": digest, "size_bytes": size}
    return training, {checkpoint_key: checkpoint}
