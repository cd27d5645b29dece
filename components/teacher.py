"""Pseudo-labels from a teacher model (docs/flywheel.md): captured samples that no app and no person labelled are
run through a teacher classifier with ONNX Runtime, and its top-1 class becomes a label record of source
``teacher`` (``labels/teacher/<model>/<capture-id>/<sample>.json``) when its softmax probability is at least the
confidence threshold. A teacher's label is the weakest source (human > app > teacher) and never enters a field slice
(:mod:`components.field_data`).

The teacher is ``deployed`` — the ``fp32-dense`` ONNX of the version a channel points at, with the channel pointer
and manifest signature-checked against the trusted keys and the file's sha256 checked before it runs — or an ONNX
classifier named by a local path or an ``s3://bucket/key`` URI. A URI teacher's classes are the ``labels`` entry of
its ONNX metadata (a JSON list) when it has one, else the capturing version's classes in order.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.datasets import (
    Manifests,
    cloud_labels,
    find_captures,
    labelled_elsewhere,
    read_shard,
    write_label_records,
)
from components.field_labels import app_values
from edgeloop_core.contract.captures import tensor_array
from edgeloop_core.contract.datasets import LabelRecord
from edgeloop_core.contract.digest import sha256_bytes
from edgeloop_core.errors import ConfigError, ContractError, ObjectNotFound

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgeloop_core.contract.datasets import DatasetLayout
    from edgeloop_core.contract.layout import ArtifactLayout
    from edgeloop_core.contract.manifest import Manifest
    from edgeloop_core.store import ObjectStore

DEPLOYED = "deployed"
TEACHER_VARIANT = "fp32-dense"
BATCH = 256
"""Samples per ONNX Runtime call (a teacher with a fixed batch size runs at that size)."""


@dataclass
class Teacher:
    """A loaded teacher: who it is (the records' ``by``), its ONNX bytes' sha256, its session and classes (None:
    the capturing version's)."""

    identity: str
    sha256: str
    session: Any
    output: str
    classes: list[str] | None

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``[samples, classes]`` for preprocessed inputs ``x``."""
        spec = self.session.get_inputs()[0]
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
        step = fixed or BATCH
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        parts = []
        try:
            for start in range(0, len(x), step):
                chunk = x[start:start + step].astype(dtype, copy=False)
                if fixed and len(chunk) < fixed:  # a fixed batch: pad the last chunk, keep its real rows
                    chunk = np.concatenate([chunk, np.zeros((fixed - len(chunk), *chunk.shape[1:]), dtype)])
                scores = self.session.run([self.output], {spec.name: chunk})[0]
                parts.append(np.asarray(scores, dtype=np.float64).reshape(len(chunk), -1)[:len(x) - start])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"teacher {self.identity} cannot run on the captured inputs "
                              f"{list(x.shape[1:])}: {first[:200]}") from exc
        return probabilities(np.concatenate(parts) if parts else np.zeros((0, 0)))


def probabilities(scores: np.ndarray) -> np.ndarray:
    """``scores`` ``[samples, classes]`` softmaxed, unless each row is a probability distribution already."""
    if scores.size == 0 or (np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)):
        return scores
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def _session(model: bytes, where: str) -> Any:  # noqa: ANN401 - an onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ...
        raise ConfigError(f"teacher {where} is not an ONNX model ONNX Runtime can load ({type(exc).__name__})") \
            from exc


def _deployed(store: ObjectStore, artifacts: ArtifactLayout, model: str, channel: str,
              trusted: list[Ed25519PublicKey]) -> Teacher:
    from edgeloop_core.contract import verify_file
    from edgeloop_core.published import read_manifest, resolve_version

    version = resolve_version(store, artifacts, model, channel, trusted)
    manifest = read_manifest(store, artifacts, model, version, trusted)
    variant = next((v for v in manifest.variants if v.name == TEACHER_VARIANT), None) or next(
        (v for v in manifest.variants if v.precision == "fp32" and not v.pruned and "onnxruntime" in v.backends
         and v.quantization == "none"), None)
    if variant is None:
        raise ConfigError(f"{model}/{version} (channel {channel}) has no {TEACHER_VARIANT} variant to teach with")
    with tempfile.TemporaryDirectory(prefix="edgeloop-teacher-") as tmp:
        local = store.download_file(artifacts.file_key(model, version, variant.file), Path(tmp) / "teacher.onnx")
        verify_file(local, variant)
        data = local.read_bytes()
    output = manifest.task.roles.get("logits") or manifest.outputs[0].name
    return Teacher(f"{model}/{version}/{variant.name}", sha256_bytes(data), _session(data, f"{model}/{version}"),
                   output, list(manifest.labels) or None)


def _uri(store: ObjectStore, uri: str) -> Teacher:
    from edgeloop_core.store import ObjectStore

    try:
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://"):].partition("/")
            data = ObjectStore(bucket, endpoint_url=store.endpoint_url).get_bytes(key)
        else:
            data = Path(uri.removeprefix("file://")).expanduser().read_bytes()
    except (OSError, ObjectNotFound) as exc:
        raise ConfigError(f"teacher {uri}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from exc
    session = _session(data, uri)
    outputs = [o.name for o in session.get_outputs()]
    meta = session.get_modelmeta().custom_metadata_map
    try:
        classes = json.loads(meta["labels"]) if "labels" in meta else None
    except ValueError as exc:
        raise ConfigError(f"teacher {uri}: its `labels` metadata is not a JSON list") from exc
    return Teacher(uri, sha256_bytes(data), session, "logits" if "logits" in outputs else outputs[0], classes)


def load_teacher(store: ObjectStore, artifacts: ArtifactLayout, model: str, teacher: str, *, channel: str = "stable",
                 trusted: list[Ed25519PublicKey] | None = None) -> Teacher:
    """The teacher ``teacher`` names: ``deployed`` (``channel``'s version, verified) or an ONNX path/``s3://`` URI."""
    if not teacher:
        raise ConfigError("no teacher named: use `deployed` or an ONNX path or s3:// URI")
    if teacher == DEPLOYED:
        from components.deployed import trusted_keys

        return _deployed(store, artifacts, model, channel, trusted if trusted is not None else trusted_keys())
    return _uri(store, teacher)


@dataclass
class TeacherRun:
    """What a teacher run did: its records (written), how many unlabelled samples it saw, how many it left
    below the threshold, how many this teacher had labelled already, and how many it put in a class the captured
    model does not have."""

    identity: str
    records: list[LabelRecord] = field(default_factory=list)
    unlabelled: int = 0
    below: int = 0
    already: int = 0
    unknown: int = 0


@dataclass
class _Pending:
    rows: list[tuple[dict[str, Any], str, int, Manifest]] = field(default_factory=list)
    x: list[np.ndarray] = field(default_factory=list)


def _labelled(store: ObjectStore, layout: DatasetLayout, model: str,
              identity: str) -> tuple[set[tuple[str, int]], set[tuple[str, str]], set[tuple[str, int]]]:
    """(capture id, sample) with a human label; (device, request id) with a device label record; (capture id,
    sample) this teacher labelled already."""
    found = cloud_labels(store, layout, model)

    def sample_of(keys: dict[str, str]) -> Iterable[tuple[str, tuple[str, int]]]:
        for key, capture_id in keys.items():
            stem = key.rsplit("/", 1)[-1].removesuffix(".json")
            if stem.isdigit():
                yield key, (capture_id, int(stem))

    human = {pair for _, pair in sample_of(found["human"])}
    mine = set()
    for key, pair in sample_of(found["teacher"]):
        try:
            if LabelRecord.model_validate_json(store.get_bytes(key)).by == identity:
                mine.add(pair)
        except ValueError:
            continue  # a broken record is replaced
    _, requests = labelled_elsewhere(store, layout, model)
    return human, requests, mine


def run_teacher(store: ObjectStore, layout: DatasetLayout, artifacts: ArtifactLayout, model: str, *, teacher: str,
                min_confidence: float, since: date | None = None, channel: str = "stable",
                trusted: list[Ed25519PublicKey] | None = None) -> TeacherRun:
    """Label with ``teacher`` every captured sample of ``model`` (from day ``since`` on) that has no app or human
    label and no label from this teacher yet; keep a label when the top-1 probability is ≥ ``min_confidence``.
    Writes the records only once all were made (bad input writes none)."""
    if not 0 < min_confidence <= 1:
        raise ConfigError(f"the teacher's minimum confidence must be in (0, 1], got {min_confidence}")
    loaded = load_teacher(store, artifacts, model, teacher, channel=channel, trusted=trusted)
    human, requests, mine = _labelled(store, layout, model, loaded.identity)
    manifests, pending, run = Manifests(store, artifacts), _Pending(), TeacherRun(loaded.identity)
    shards, _ = find_captures(store, layout, model, since)
    for ref in shards:
        for row in read_shard(store, ref, ("capture_id", "version", "request_id", "inputs", "label")).rows:
            manifest = manifests.get(model, row["version"])
            if manifest is None or (ref.device, row["request_id"] or "") in requests:
                continue
            x = _input_of(row["inputs"], manifest)
            if x is None:
                continue
            app = {s for s, _ in app_values(_json(row["label"]), len(x))} if row["label"] is not None else set()
            for sample in range(len(x)):
                key = (row["capture_id"], sample)
                if sample in app or key in human:
                    continue
                run.unlabelled += 1
                if key in mine:
                    run.already += 1
                    continue
                pending.rows.append(({**row, "device_id": ref.device}, row["capture_id"], sample, manifest))
                pending.x.append(x[sample])
    _judge(loaded, pending, run, model, min_confidence)
    write_label_records(store, layout, run.records)
    return run


def _input_of(inputs: list[dict[str, Any]], manifest: Manifest) -> np.ndarray | None:
    """The captured float input the manifest names, ``[batch, ...]`` float32; None when the item has none (not a
    classifier's input: nothing to teach)."""
    name = manifest.inputs[0].name if manifest.inputs else None
    tensor = next((t for t in inputs if t["name"] == name), inputs[0] if len(inputs) == 1 else None)
    if tensor is None or tensor["dtype"] == "bytes" or np.dtype(tensor["dtype"]).kind != "f":
        return None
    array = tensor_array(tensor)
    return array.astype(np.float32, copy=False) if array.ndim >= 2 else None


def _json(text: str) -> Any:  # noqa: ANN401 - any JSON value
    try:
        return json.loads(text)
    except ValueError:
        return None


def _judge(teacher: Teacher, pending: _Pending, run: TeacherRun, model: str, min_confidence: float) -> None:
    """Run the teacher over the pending samples (grouped by sample shape) and keep the confident labels."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, x in enumerate(pending.x):
        by_shape.setdefault(tuple(x.shape), []).append(index)
    now = datetime.now(timezone.utc)
    for indices in by_shape.values():
        scores = teacher.probabilities(np.stack([pending.x[i] for i in indices]))
        for index, row_scores in zip(indices, scores, strict=True):
            row, capture_id, sample, manifest = pending.rows[index]
            top, confidence = int(row_scores.argmax()), float(row_scores.max())
            if confidence < min_confidence:
                run.below += 1
                continue
            classes = teacher.classes or manifest.labels
            if len(row_scores) != len(classes):
                raise ContractError(f"teacher {teacher.identity} gives {len(row_scores)} scores per sample, "
                                    f"{model}/{manifest.version} has {len(classes)} classes")
            name = classes[top]
            if name not in manifest.labels:
                run.unknown += 1  # a class the captured model does not know: no label for it
                continue
            run.records.append(LabelRecord(
                capture_id=capture_id, sample=sample, model=model, source="teacher",
                label=manifest.labels.index(name), class_name=name, time=now, by=teacher.identity,
                origin=f"teacher p={confidence:.4f}, onnx sha256 {teacher.sha256[:16]}",
                device_id=row["device_id"], request_id=row["request_id"] or ""))
