"""The manifest: everything the edge needs to fetch, verify, build, validate and serve one model version."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeloop_core.contract.field import FieldBaseline
from edgeloop_core.contract.layout import MANIFEST_FILE
from edgeloop_core.contract.target import TargetKey
from edgeloop_core.errors import ConfigError, ManifestInvalid

SCHEMA_VERSION = 4
"""Bumped on any change the edge must know about; the edge refuses a manifest newer than it understands.
2: variants carry ``preferred`` and ``speedup`` (the pipeline's CPU speed-up figures).
3: a ``task`` (what the outputs mean: classification, detection with its layout, declared output slices) and the
validation metrics that judge by it (``top1_agreement``, ``tensor_agreement``, ``detection_f1``, ``detection_map50``),
with the negative control measured when the validation set was made.
4: ``engines`` keyed by target key *and* variant (``<target-key>/<variant>``, :func:`engine_entry`): ``fp32`` and
``fp32-dense`` share a target key, so a key of its own lets a manifest carry a prebuilt engine for each. Schemas 1-3
keyed by target key alone (one engine per target, its file named after the variant) and are still read. Also, both
optional: ``field_baseline``, the training data's field statistics (:mod:`edgeloop_core.drift`) that a device
compares what it serves with, for drift; ``preprocessing.clip``, a clip model's frames, frame rate, stride and
layout."""

ENGINES_BY_VARIANT_SCHEMA = 4
"""The first schema whose ``engines`` are keyed ``<target-key>/<variant>``."""


def engine_entry(target_key: str, variant: str) -> str:
    """The key of a prebuilt engine in :attr:`Manifest.engines` (schema 4): ``<target-key>/<variant>``, the same
    two levels as its place in the bucket (``engines/<target-key>/<variant>.plan``)."""
    return f"{target_key}/{variant}"

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
"""Model names, versions and channels: lower case, safe in S3 keys, Kubernetes annotations and file names."""

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                   "FP64", "BYTES"]
Precision = Literal["fp32", "fp16", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A model input or output, in Open Inference Protocol terms."""

    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 marks a dynamic axis (the batch axis first)")


TaskKind = Literal["classification", "detection", "keyword_spotting", "embedding", "raw"]
DetectionLayout = Literal["yolov5", "yolov8", "end2end", "separate"]
"""How a detector's outputs are laid out:

* ``yolov8``: one output ``[batch, 4 + classes, anchors]`` (YOLOv8/v11 exports): boxes ``cx, cy, w, h`` then one
  score per class, before NMS;
* ``yolov5``: one output ``[batch, anchors, 5 + classes]``: ``cx, cy, w, h``, objectness, class scores, before NMS;
* ``end2end``: one output ``[batch, detections, 6]``: ``x1, y1, x2, y2, score, class`` (YOLOv10, NMS-appended exports);
* ``separate``: outputs named by role in :attr:`Task.roles`: ``boxes`` ``[batch, n, 4]`` (``x1, y1, x2, y2``),
  ``scores`` ``[batch, n]`` (or ``[batch, n, classes]``), optionally ``classes`` ``[batch, n]`` and
  ``num_detections`` ``[batch]`` (or ``[batch, 1]``)."""


class OutputSlice(_Strict):
    """A named part of one output, taken along one axis and compared on its own: a detector's box coordinates and its
    class scores are different quantities and must never be judged as one number."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    output: str
    axis: int = Field(ge=1, description="axis of the output the slice is taken along (0 is the batch)")
    start: int = Field(ge=0)
    stop: int | None = Field(default=None, description="exclusive end; none: to the end of the axis")


class Task(_Strict):
    """What a model's outputs mean, so the gate, the device's validation and its variant choice judge by the task's
    metric (top-1, detections, each output and slice on its own) and never by one number over mixed quantities."""

    kind: TaskKind = "classification"
    layout: DetectionLayout | None = Field(default=None, description="detection only: how the outputs are laid out")
    roles: dict[str, str] = Field(
        default_factory=dict,
        description="role -> output name: `logits` for a classifier with several outputs; `boxes`, `scores`, "
                    "`classes`, `num_detections` for the separate detection layout")
    num_classes: int | None = Field(default=None, gt=0)
    slices: list[OutputSlice] = Field(default_factory=list,
                                      description="declared slices, compared each on its own (detection: derived)")
    score_threshold: float = Field(default=0.25, ge=0.0, le=1.0,
                                   description="detection: boxes below this score are not detections")
    iou_threshold: float = Field(default=0.45, gt=0.0, le=1.0, description="detection: NMS overlap threshold")

    @model_validator(mode="after")
    def _layout_for_detection(self) -> Task:
        if self.kind == "detection" and self.layout is None:
            raise ValueError("a detection task needs its layout (yolov5, yolov8, end2end or separate)")
        if self.kind != "detection" and self.layout is not None:
            raise ValueError(f"layout {self.layout!r} is for detection, not {self.kind}")
        if self.layout == "separate" and not {"boxes", "scores"} <= set(self.roles):
            raise ValueError("the separate detection layout names its `boxes` and `scores` outputs in roles")
        return self


class Clip(_Strict):
    """A clip model's input: ``frames`` consecutive frames sampled at ``fps``; a streaming client starts a window
    every ``stride`` frames. ``layout``: where the time axis sits (``NCTHW``: channels before time)."""

    frames: int = Field(ge=1)
    fps: float = Field(gt=0)
    stride: int = Field(default=1, ge=1)
    layout: Literal["NCTHW", "NTCHW"] = "NCTHW"


class Preprocessing(_Strict):
    """How a client turns raw data into the input tensor: ``x = (raw * scale - mean) / std`` per channel."""

    kind: Literal["image", "spectrogram", "none"] = "image"
    layout: str = "NCHW"
    scale: float = 1.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    params: dict[str, float | int | str] = Field(default_factory=dict)
    clip: Clip | None = Field(default=None, description="clip models: frames per clip, frame rate, stride, layout")

    @model_validator(mode="after")
    def _clip_layout(self) -> Preprocessing:
        if self.clip is not None and self.clip.layout != self.layout:
            raise ValueError(f"preprocessing layout {self.layout!r} differs from its clip's {self.clip.layout!r}")
        return self


class FileRef(_Strict):
    """A file of the version, relative to the version's prefix, with its digest."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)

    @field_validator("file")
    @classmethod
    def _relative(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/") or not value:
            raise ValueError(f"file must be a relative path inside the version, got {value!r}")
        return value


class Variant(FileRef):
    """One exported model file: a precision and a quantization flavour for a kind of backend."""

    name: str = Field(pattern=NAME_PATTERN)
    precision: Precision
    quantization: Literal["none", "modelopt-qdq", "ort-qdq"] = "none"
    backends: list[Literal["tensorrt", "onnxruntime"]]
    pruned: bool = False
    accuracy: float | None = Field(default=None, description="test-set top-1 accuracy measured in the cloud, 0..1")
    params: int | None = None
    flops: int | None = Field(default=None, description="FLOPs of one sample (2 x MACs)")
    preferred: bool = Field(
        default=True,
        description="false: the pipeline measured no pay-off (below its min_speedup); a device measures it only "
                    "when nothing preferred is compatible, and never picks it by default")
    speedup: dict[str, float] = Field(
        default_factory=dict,
        description="the pipeline's ONNX Runtime CPU speed-ups, e.g. {'b1_vs_fp32': 1.4, 'b16_vs_fp32-dense': 2.1}")


class Validation(FileRef):
    """The held-out set the device runs before it serves, and what it must reach."""

    metric: Literal["top1_accuracy", "output_agreement", "top1_agreement", "tensor_agreement", "detection_f1",
                    "detection_map50"] = Field(
        default="top1_accuracy",
        description="top1_accuracy: against labels; detection_map50: COCO mAP@0.5 against labels; with no labels, "
                    "agreement with the FP32 model: top1_agreement (classifiers), detection_f1 (matched boxes after "
                    "decode and NMS), tensor_agreement (each output and declared slice on its own, a collapsed one "
                    "fails); output_agreement: one cosine over all outputs (schema 2, still read)")
    num_samples: int = Field(gt=0)
    reference: dict[str, float] = Field(description="metric measured in the cloud on this file, per variant name")
    tolerance: float = Field(ge=0.0, description="allowed drop below the reference, same units as the metric")
    control: float | None = Field(
        default=None,
        description="the metric on shuffled pairings (a negative control), measured when the set was made: it must lie "
                    "clearly below the reference minus tolerance, or the set could not tell right from wrong")


class EngineRef(FileRef):
    """A prebuilt (or shared back) engine for one target key and variant."""

    built_by: str = ""


class Signature(_Strict):
    """ed25519 signature over the manifest's canonical JSON (every field but ``signature``)."""

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str
    value: str = Field(description="base64 of the 64-byte signature")


class Manifest(_Strict):
    """``models/<name>/<version>/manifest.json``."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    created_at: datetime
    pipeline_run: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    task: Task = Field(default_factory=Task)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    labels: list[str] = Field(default_factory=list)
    variants: list[Variant] = Field(min_length=1)
    validation: Validation
    report: FileRef | None = None
    engines: dict[str, EngineRef] = Field(
        default_factory=dict,
        description="prebuilt engines: schema 4 keys them `<target-key>/<variant>` (engine_entry); schemas 1-3 by "
                    "target key alone")
    field_baseline: FieldBaseline | None = Field(
        default=None, description="the training data's field statistics (edgeloop_core.drift), for drift")
    signature: Signature | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is newer than this runtime understands ({SCHEMA_VERSION})"
            )
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        missing = set(self.validation.reference) - set(names)
        if missing:
            raise ValueError(f"validation.reference names unknown variants: {sorted(missing)}")
        files = [ref.file for ref in self.files()]
        clashes = sorted({f for f in files if files.count(f) > 1 or f == MANIFEST_FILE})
        if clashes:  # each file has its own place beside manifest.json in the bucket and in a device's cache
            raise ValueError(f"file names must be unique and not {MANIFEST_FILE!r}, got {clashes}")
        if self.schema_version >= ENGINES_BY_VARIANT_SCHEMA:
            self._check_engine_keys(names)
        return self

    def _check_engine_keys(self, names: list[str]) -> None:
        for key in self.engines:
            target, _, variant = key.rpartition("/")
            if not target or variant not in names:
                raise ValueError(f"engines are keyed <target-key>/<variant> with a variant of this manifest "
                                 f"(schema {ENGINES_BY_VARIANT_SCHEMA}), got {key!r}")
            try:
                TargetKey.parse(target)
            except ConfigError as exc:
                raise ValueError(f"engine {key!r}: {exc}") from exc

    def engine_for(self, target_key: str, variant: str) -> EngineRef | None:
        """The prebuilt engine this manifest lists for ``target_key`` and ``variant``, or ``None``.

        Schemas 1-3 keyed engines by target key alone: there the engine counts for ``variant`` only when its file is
        named after it (``<variant>.plan``), as the runtime of that time required."""
        if self.schema_version >= ENGINES_BY_VARIANT_SCHEMA:
            return self.engines.get(engine_entry(target_key, variant))
        ref = self.engines.get(target_key)
        return ref if ref is not None and PurePosixPath(ref.file).name.startswith(f"{variant}.") else None

    def variant(self, name: str) -> Variant:
        """The variant called ``name``; ``KeyError`` if there is none."""
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)

    def files(self) -> list[FileRef]:
        """Every file the manifest vouches for (variants, validation set, report, engines)."""
        refs: list[FileRef] = [*self.variants, self.validation]
        if self.report is not None:
            refs.append(self.report)
        refs.extend(self.engines.values())
        return refs

    def with_engine(self, target_key: str, variant: str, ref: EngineRef) -> Manifest:
        """A copy (unsigned, schema :data:`SCHEMA_VERSION`) that also lists ``ref`` as the prebuilt engine for
        ``target_key`` and ``variant``: how a publisher adds engines before it signs. :class:`ManifestInvalid` when
        the variant is not in this manifest or the target key does not parse."""
        if self.schema_version < ENGINES_BY_VARIANT_SCHEMA and self.engines:
            raise ManifestInvalid(f"{self.name}/{self.version} keys its engines by target key alone (schema "
                                  f"{self.schema_version}): it cannot take engines per variant")
        payload = self.model_dump(mode="json", exclude={"signature"})
        payload.update(schema_version=SCHEMA_VERSION,
                       engines={**payload["engines"], engine_entry(target_key, variant): ref.model_dump(mode="json")})
        try:
            return Manifest.model_validate(payload)
        except ValidationError as exc:
            why = exc.errors()[0]["msg"]
            raise ManifestInvalid(f"cannot add the engine for {target_key}/{variant}: {why}") from exc

    def canonical_bytes(self) -> bytes:
        """The bytes that are signed: sorted-key compact JSON of every field except ``signature``.

        Fields added since schema 3 (``task``, ``validation.control``, ``field_baseline``) are left out while they
        hold their defaults, so a manifest signed before they existed verifies exactly as it did."""
        payload = self.model_dump(mode="json", exclude={"signature"})
        if self.field_baseline is None:
            del payload["field_baseline"]
        if self.preprocessing.clip is None:
            del payload["preprocessing"]["clip"]
        if self.task == Task():
            del payload["task"]
        if self.validation.control is None:
            del payload["validation"]["control"]
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def to_json(self) -> str:
        """Pretty JSON as written to S3."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, data: str | bytes) -> Manifest:
        """Parse and validate; any problem becomes :class:`ManifestInvalid` with one readable line."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise ManifestInvalid(f"manifest.json is invalid at {where}: {first['msg']}") from exc
