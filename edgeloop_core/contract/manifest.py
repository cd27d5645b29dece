"""The manifest: everything the edge needs to fetch, verify, build, validate and serve one model version."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeloop_core.errors import ManifestInvalid

SCHEMA_VERSION = 2
"""Bumped on any change the edge must know about; the edge refuses a manifest newer than it understands.
2: variants carry ``preferred`` and ``speedup`` (the pipeline's CPU speed-up figures)."""

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


class Preprocessing(_Strict):
    """How a client turns raw data into the input tensor: ``x = (raw * scale - mean) / std`` per channel."""

    kind: Literal["image", "spectrogram", "none"] = "image"
    layout: str = "NCHW"
    scale: float = 1.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    params: dict[str, float | int | str] = Field(default_factory=dict)


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

    metric: Literal["top1_accuracy", "output_agreement"] = "top1_accuracy"
    num_samples: int = Field(gt=0)
    reference: dict[str, float] = Field(description="metric measured in the cloud on this file, per variant name")
    tolerance: float = Field(ge=0.0, description="allowed drop below the reference, same units as the metric")


class EngineRef(FileRef):
    """A prebuilt (or shared back) TensorRT engine for one target key."""

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
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    labels: list[str] = Field(default_factory=list)
    variants: list[Variant] = Field(min_length=1)
    validation: Validation
    report: FileRef | None = None
    engines: dict[str, EngineRef] = Field(default_factory=dict)
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
        return self

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

    def canonical_bytes(self) -> bytes:
        """The bytes that are signed: sorted-key compact JSON of every field except ``signature``."""
        payload = self.model_dump(mode="json", exclude={"signature"})
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
