"""Field capture in the artifact contract: the per-model capture policy, the device-wide capture settings, where
captured items and labels land in the bucket, and the columns of a capture shard (docs/capture.md)::

    <prefix>/captures/<device>/models/<model>/<yyyy-mm-dd>/<shard>.parquet   captured items (one row each)
    <prefix>/captures/<device>/labels/<model>/<yyyy-mm-dd>/<label>.json      labels that found no spooled item

Everything a device writes lies under its own ``captures/<device>/``: one prefix to grant a device's S3 identity,
and nothing of another device's or of the models/ tree in reach. A shard's name is derived from the capture ids it
holds (:func:`shard_name`), so an upload repeated after a crash or an outage overwrites the same key: at least once,
never twice. The date is the UTC day of the items' capture time.

A model's entry in the desired state may carry ``capture:`` (a :class:`CapturePolicy`); without one the model is
not captured. The desired file may also carry a top-level ``capture:`` (:class:`CaptureSettings`), whose
``enabled: false`` turns capture off on every device that reads it.
"""

from __future__ import annotations

import ast
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CAPTURE_PAYLOAD_PARAMETER = "edgeloop.capture_payload"
"""ModelInfer request parameter with the raw data the app attaches (the JPEG or WAV the tensor came from), base64
in a ``string_param`` (the Open Inference Protocol's parameters carry no bytes; tritonclient sends
``parameters={"edgeloop.capture_payload": base64.b64encode(data).decode()}``). Stored with the capture, never given
to the model, ignored when the request is not captured."""
CAPTURE_PAYLOAD_TYPE_PARAMETER = "edgeloop.capture_payload_type"
"""Optional ``string_param``: the payload's media type (``image/jpeg``, ``audio/wav``), stored beside it."""
CAPTURE_GROUP_PARAMETER = "edgeloop.capture_group"
"""Optional ``string_param``: who or what the request's data came from beyond the device (a speaker, a camera id),
stored in the capture's ``group`` column (``""`` without one). The flywheel keeps a device's and a group's items on
one side of its split, so that no speaker is both trained on and tested on. At most :data:`CAPTURE_GROUP_MAX_CHARS`
characters, no control characters; otherwise captured with ``""`` (logged, without the value)."""
CAPTURE_GROUP_MAX_CHARS = 128
"""Longest capture group, characters."""

RULE_FUNCTIONS = ("abs", "max", "min", "mean", "sum", "std", "softmax", "entropy", "margin", "count")
"""Functions a policy's ``expression`` may call (see docs/capture.md); names are the model's output names."""
_RULE_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.BinOp,
               ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq,
               ast.NotEq, ast.Call, ast.Name, ast.Load, ast.Constant, ast.Subscript, ast.Slice, ast.Tuple)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_expression(expression: str) -> ast.Expression:
    """The parsed ``expression`` when it uses only numbers, output names, arithmetic, comparisons, ``and``/``or``/
    ``not``, indexing and :data:`RULE_FUNCTIONS`; a ValueError naming what is not allowed otherwise."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"expression {expression!r} does not parse: {exc.msg}") from exc
    for node in ast.walk(tree):
        if not isinstance(node, _RULE_NODES):
            raise ValueError(f"expression {expression!r}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in RULE_FUNCTIONS
                                               and not node.keywords):
            raise ValueError(f"expression {expression!r}: only {', '.join(RULE_FUNCTIONS)} may be called")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, bool)):
            raise ValueError(f"expression {expression!r}: only numbers may be written in it")
    return tree


class HardExamples(_Strict):
    """Which requests are hard examples, by the model's declared task. Any rule that holds for any sample of the
    request captures it (budgets permitting)."""

    margin_below: float | None = Field(
        None, gt=0, le=1, description="classifier: top-1 minus top-2 probability below this (logits are softmaxed)")
    entropy_above: float | None = Field(
        None, ge=0, lt=1, description="classifier: entropy of the class probabilities over its maximum, log(classes), "
                                      "above this (0: certain, 1: uniform)")
    uncertain_band: tuple[float, float] | None = Field(
        None, description="detector: [low, high) confidence band of uncertain boxes (boxes scoring at or below low "
                          "are not counted at all)")
    uncertain_share_above: float = Field(
        0.5, ge=0, lt=1, description="detector: capture when this share of the boxes above `low` lies in the band")
    expression: str | None = Field(
        None, description="other outputs: a small expression over the output names that is true for a hard example, "
                          "e.g. `max(abs(score)) < 0.2` (functions: " + ", ".join(RULE_FUNCTIONS) + ")")
    entry_point: str | None = Field(
        None, description="other outputs: `module:function` importable on the device, called with (outputs, inputs) "
                          "as dicts of numpy arrays; a true result captures the request")

    @field_validator("uncertain_band")
    @classmethod
    def _band(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1] <= 1:
            raise ValueError("uncertain_band is [low, high) with 0 <= low < high <= 1")
        return value

    @field_validator("expression")
    @classmethod
    def _expression(cls, value: str | None) -> str | None:
        if value is not None:
            check_expression(value)
        return value

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, value: str | None) -> str | None:
        if value is not None:
            module, _, function = value.partition(":")
            if not module or not function.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
                raise ValueError(f"entry_point {value!r} is not `package.module:function`")
        return value


class DriftBurst(_Strict):
    """A burst of capture while what a model serves on this device drifts from its training baseline: when the
    largest Jensen-Shannon distance over the features of the device's field statistics (the counts it hands to its
    stats event, against the manifest's ``field_baseline``) exceeds ``threshold``, ``sample_rate`` of requests are
    captured (policy ``drift_burst``) for ``minutes``. Needs field statistics on (``EDGE_FIELD_STATS_RATE`` > 0)
    and a manifest with a field baseline; the policy's budgets still apply."""

    threshold: float = Field(0.2, gt=0, lt=1, description="largest per-feature Jensen-Shannon distance (base 2, "
                                                          "0..1) above which a burst starts")
    sample_rate: float = Field(0.2, gt=0, le=1, description="share of requests captured at random during a burst")
    minutes: float = Field(10.0, gt=0, le=24 * 60, description="how long a burst lasts, minutes (drift seen again "
                                                               "meanwhile extends it)")


class CapturePolicy(_Strict):
    """How one model's requests are captured on a device (absent: not at all). ``sample_rate`` captures that share
    of requests at random; ``hard_examples`` adds those its rules find hard; the budgets cap what either takes."""

    sample_rate: float = Field(0.0, ge=0, le=1, description="share of requests captured at random (0.005: 0.5%)")
    hard_examples: HardExamples | None = Field(None, description="rules by the model's task (unset: none)")
    items_per_hour: int | None = Field(
        600, ge=0, description="most items captured in any hour (unset: no cap); beyond it: dropped, counted")
    bytes_per_day: int | None = Field(
        1 << 30, ge=0, description="most bytes captured in any 24 hours (unset: no cap); beyond it: dropped, counted")
    disk_free_floor_bytes: int = Field(
        1 << 30, ge=0, description="capture stops while the spool's disk has less free space than this, bytes "
                                   "(serving goes on; logged once per change)")
    keep_payload: bool = Field(True, description="store the raw payload an app attaches to a request")
    drift_burst: DriftBurst | None = Field(
        None, description="capture more while the device's field statistics drift from the training baseline "
                          "(unset: no bursts)")

    @model_validator(mode="after")
    def _something_to_capture(self) -> CapturePolicy:
        hard = self.hard_examples
        if hard is not None and not any((hard.margin_below, hard.entropy_above is not None, hard.uncertain_band,
                                         hard.expression, hard.entry_point)):
            raise ValueError("hard_examples names no rule: set margin_below, entropy_above, uncertain_band, "
                             "expression or entry_point")
        return self


class CaptureSettings(_Strict):
    """Capture on the whole device (the desired file's top-level ``capture:``)."""

    enabled: bool = Field(True, description="false: no model is captured, whatever its policy (fleet-wide off)")
    spool_max_bytes: int = Field(256 << 20, gt=0, description="spool cap on disk, bytes; above it oldest go first")
    queue_items: int = Field(256, gt=0, description="requests waiting for the capture worker; beyond: dropped")
    shard_max_items: int = Field(512, gt=0, description="most items in one Parquet shard")
    shard_max_age_s: float = Field(60.0, gt=0, description="a spooled item waits at most this long for a shard, s")


def shard_name(capture_ids: Iterable[str]) -> str:
    """A shard's file name, from the ids it holds (order does not matter): the same items, the same key."""
    joined = "\n".join(sorted(capture_ids)).encode()
    return hashlib.sha256(joined).hexdigest()[:32] + ".parquet"


@dataclass(frozen=True)
class CaptureLayout:
    """Builds capture and label keys under an optional ``prefix`` (as :class:`~edgeloop_core.contract.layout.
    ArtifactLayout`)."""

    prefix: str = ""

    def device_prefix(self, device: str) -> str:
        """Everything ``device`` writes (ends with ``/``): the one prefix its S3 identity needs."""
        cleaned = self.prefix.strip("/")
        return f"{cleaned}/captures/{device}/" if cleaned else f"captures/{device}/"

    def shard_key(self, device: str, model: str, day: date, shard: str) -> str:
        """Key of a capture shard (``shard`` from :func:`shard_name`)."""
        return f"{self.device_prefix(device)}models/{model}/{day.isoformat()}/{shard}"

    def label_key(self, device: str, model: str, day: date, label_id: str) -> str:
        """Key of a label that found no spooled item to join."""
        return f"{self.device_prefix(device)}labels/{model}/{day.isoformat()}/{label_id}.json"

    def device_grants(self, device: str) -> DeviceGrants:
        """What ``device``'s S3 identity needs, and no more: read the models tree (manifests, channel pointers,
        variants, validation sets), write its own captures and labels."""
        cleaned = self.prefix.strip("/")
        return DeviceGrants(read=f"{cleaned}/models/" if cleaned else "models/", write=self.device_prefix(device))


@dataclass(frozen=True)
class DeviceGrants:
    """A device's S3 grants as key prefixes (each ends with ``/``): ``read`` (GetObject) and ``write`` (PutObject).
    A device that shares its built engines back (``EDGE_SHARE_ENGINES``) also writes under
    ``models/<model>/<version>/engines/``, which these grants leave out."""

    read: str
    write: str

    def iam_policy(self, bucket: str) -> dict[str, object]:
        """The grants as an AWS IAM policy document (attach it to the device's user or role)."""
        return {"Version": "2012-10-17", "Statement": [
            {"Sid": "ReadModels", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [f"arn:aws:s3:::{bucket}/{self.read}*"]},
            {"Sid": "WriteOwnCaptures", "Effect": "Allow", "Action": ["s3:PutObject"],
             "Resource": [f"arn:aws:s3:::{bucket}/{self.write}*"]}]}


TENSOR_FIELDS = ("name", "dtype", "shape", "data")
"""Each entry of a shard's ``inputs`` and ``outputs``: the tensor's name, its numpy dtype (``float32``; ``bytes``
for an OIP BYTES tensor, length-prefixed as in the protocol), its shape, and its C-order little-endian bytes:
``np.frombuffer(t["data"], t["dtype"]).reshape(t["shape"])``."""
def tensor_array(record: dict[str, Any]) -> np.ndarray[Any, np.dtype[Any]]:
    """The array a shard's tensor entry holds (``{name, dtype, shape, data}``, :data:`TENSOR_FIELDS`): a numeric
    tensor from its little-endian bytes, an OIP BYTES tensor (``dtype`` ``bytes``, each element length-prefixed with
    a little-endian uint32 as in the protocol) as an object array of ``bytes``."""
    if record["dtype"] == "bytes":
        data, items, offset = record["data"], [], 0
        while offset < len(data):
            (size,) = struct.unpack_from("<I", data, offset)
            items.append(data[offset + 4:offset + 4 + size])
            offset += 4 + size
        strings: np.ndarray[Any, np.dtype[Any]] = np.array(items, dtype=object).reshape(record["shape"])
        return strings
    dtype = np.dtype(record["dtype"]).newbyteorder("<")
    values: np.ndarray[Any, np.dtype[Any]] = np.frombuffer(record["data"], dtype=dtype).reshape(record["shape"])
    return values


CAPTURE_COLUMNS = ("capture_id", "time", "device_id", "model", "version", "variant", "target_key", "request_id",
                   "policy", "score", "inputs", "outputs", "payload", "payload_type", "label", "label_source",
                   "label_time", "group")
"""The columns of a capture shard, in order (types in docs/capture.md). ``group`` came last and later: shards
written before it lack it, and a reader takes ``""`` for them (:data:`CAPTURE_OPTIONAL_COLUMNS`)."""
CAPTURE_OPTIONAL_COLUMNS: dict[str, str] = {"group": ""}
"""Columns an older shard may lack → the value a reader takes for each of its rows."""


def capture_group(value: str) -> str | None:
    """``value`` as a capture group (:data:`CAPTURE_GROUP_PARAMETER`), or ``None`` when it is too long or holds a
    control character."""
    if len(value) > CAPTURE_GROUP_MAX_CHARS or not value.isprintable():
        return None
    return value
