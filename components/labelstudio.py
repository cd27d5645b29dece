"""Human labels for captured field data through Label Studio (https://labelstud.io/guide/tasks), in its documented
JSON formats; no Label Studio server or SDK is needed here (docs/flywheel.md says how this was checked).

Export: one task per captured sample, ``{"data": {<media>: <data URI>, "capture_id": ...}, "predictions": [the
model's top-1 as a pre-annotation], "meta": {capture id, sample, device, request id, version, policy}}``, and the
labelling config (XML) that matches it: ``<Image>`` (or ``<Audio>`` for keyword spotting) and ``<Choices>`` with the
manifest's class names.

The media travel inside the task as ``data:`` URIs: a captured item is a row of a Parquet shard, not an object of
its own, so there is nothing to reference by ``s3://`` or to presign. The raw payload the app attached is used when
there is one (``image/*`` or ``audio/*`` as the app declared it or as its first bytes say, a batch of one);
otherwise the input tensor is rendered:

* images (``preprocessing.kind == "image"``, NCHW or NHWC, 1 or 3 channels): the preprocessing is undone
  (``raw * scale = x * std + mean``, which the preprocessing maps to [0, 1]) and scaled to 0-255, then enlarged with
  nearest-neighbour pixels to at least :data:`MIN_IMAGE_PIXELS` on its long side (a 8×8 digit is unreadable
  otherwise); PNG.
* audio (``preprocessing.kind == "spectrogram"``: log-mel energies, :mod:`edgeloop_core.features`): the
  normalisation is undone, the mel energies are mapped back to a linear spectrogram through the pseudo-inverse of the
  mel filter bank, and a phase is found by Griffin-Lim (:data:`GRIFFIN_LIM_ITERATIONS` iterations); 16-bit mono WAV
  at the model's sample rate. It is an approximation of what the device heard (the log-mel features drop the
  phase and fine frequency detail), intelligible enough to tell the keywords apart; attach the WAV as the capture
  payload to label the original.

Import reads Label Studio's JSON export (``annotations[].result[].value.choices``): per task, the latest annotation
that was not cancelled wins; its choice becomes a :class:`~edgeloop_core.contract.datasets.LabelRecord` with source
``human``. Every task is checked before anything is written: a bad export writes no record.
"""

from __future__ import annotations

import base64
import io
import json
import re
import wave
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from components.datasets import Manifests, class_name, class_scores, iter_items, labelled_elsewhere, tensor_array
from edgeloop_core.contract.datasets import CAPTURE_ID_PATTERN, DatasetLayout, LabelRecord
from edgeloop_core.contract.manifest import Manifest
from edgeloop_core.errors import ConfigError
from edgeloop_core.features import MelConfig, mel_filterbank
from edgeloop_core.store import ObjectStore

FROM_NAME = "label"
"""The ``<Choices>`` control's name (``from_name`` in results)."""
MIN_IMAGE_PIXELS = 256
GRIFFIN_LIM_ITERATIONS = 32
EXPORT_COLUMNS = ("capture_id", "device_id", "version", "request_id", "policy", "inputs", "outputs", "payload",
                  "payload_type", "label")


@dataclass(frozen=True)
class Media:
    """How a model's items are shown: the object tag and the ``data`` key it reads (``$image`` or ``$audio``)."""

    tag: str
    key: str


def media_of(manifest: Manifest) -> Media:
    """``<Audio>`` for a spectrogram model (keyword spotting), ``<Image>`` for an image model; ConfigError else."""
    if manifest.preprocessing.kind == "spectrogram":
        return Media("Audio", "audio")
    if manifest.preprocessing.kind == "image":
        return Media("Image", "image")
    raise ConfigError(f"{manifest.name}/{manifest.version}: its preprocessing ({manifest.preprocessing.kind}) says "
                      f"neither image nor spectrogram: there is no way to show its items to a person yet")


def labelling_config(manifest: Manifest) -> str:
    """Label Studio's labelling config (XML) for a classifier's items: the media tag and one choice per class."""
    if manifest.task.kind not in ("classification", "keyword_spotting") or not manifest.labels:
        raise ConfigError(f"{manifest.name}/{manifest.version} is a {manifest.task.kind} model"
                          + ("" if manifest.labels else " without class names")
                          + ": only classifiers with labels can be exported for labelling yet")
    media = media_of(manifest)
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in manifest.labels)
    return (f'<View>\n  <{media.tag} name="{media.key}" value="${media.key}"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{media.key}" choice="single" showInLine="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def data_uri(data: bytes, media_type: str) -> str:
    """``data:<type>;base64,...``."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def render_image(x: np.ndarray, manifest: Manifest) -> bytes:
    """One sample's image tensor (``[C, H, W]``, or ``[H, W, C]`` for an NHWC model) as PNG bytes."""
    from PIL import Image

    pre = manifest.preprocessing
    chw = np.moveaxis(x, -1, 0) if pre.layout.upper().startswith("NHWC") else x
    chw = chw.reshape((1, *chw.shape)) if chw.ndim == 2 else chw
    channels = chw.shape[0]
    std = np.resize(np.asarray(pre.std, dtype=np.float64), channels).reshape(-1, 1, 1)
    mean = np.resize(np.asarray(pre.mean, dtype=np.float64), channels).reshape(-1, 1, 1)
    unit = np.clip(chw.astype(np.float64) * std + mean, 0.0, 1.0)  # raw * scale, in [0, 1] by the preprocessing
    pixels = np.round(unit * 255).astype(np.uint8)
    image = Image.fromarray(pixels[0]) if channels == 1 else Image.fromarray(np.moveaxis(pixels[:3], 0, -1))
    factor = max(1, -(-MIN_IMAGE_PIXELS // max(image.size)))
    image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def render_audio(x: np.ndarray, manifest: Manifest) -> bytes:
    """One sample's log-mel tensor (``[1, mels, frames]`` or ``[mels, frames]``) as WAV bytes (module docstring)."""
    pre = manifest.preprocessing
    config = MelConfig.from_params(dict(pre.params))
    log_mel = x.reshape(x.shape[-2], x.shape[-1]).astype(np.float64) * pre.std[0] + pre.mean[0]
    log_mel = log_mel / (pre.scale or 1.0)
    mel_power = np.maximum(np.exp(log_mel) - 1e-6, 0.0)  # [mels, frames]
    power = np.maximum(np.linalg.pinv(mel_filterbank(config).astype(np.float64)) @ mel_power, 0.0)
    magnitude = np.sqrt(power)  # [bins, frames]
    samples = _griffin_lim(magnitude, config)
    samples = samples / max(1e-9, float(np.abs(samples).max())) * 0.9
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(config.sample_rate)
        wav.writeframes((samples * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _griffin_lim(magnitude: np.ndarray, config: MelConfig) -> np.ndarray:
    """A signal whose STFT magnitude (Hann window ``n_fft``, hop ``hop``, as :func:`~edgeloop_core.features.log_mel`)
    approaches ``magnitude`` [bins, frames] (Griffin & Lim, 1984); a fixed start phase, so the result is repeatable."""
    n_fft, hop = config.n_fft, config.hop
    frames = magnitude.shape[1]
    length = n_fft + hop * (frames - 1)
    window = np.hanning(n_fft)
    starts = np.arange(frames) * hop
    norm = np.zeros(length)
    for s in starts:
        norm[s:s + n_fft] += window ** 2
    norm = np.maximum(norm, 1e-8)
    phase = np.exp(2j * np.pi * np.random.default_rng(0).random(magnitude.shape))
    signal = np.zeros(length)
    for _ in range(GRIFFIN_LIM_ITERATIONS):
        chunks = np.fft.irfft(magnitude * phase, n=n_fft, axis=0).T * window  # [frames, n_fft]
        signal = np.zeros(length)
        for s, chunk in zip(starts, chunks, strict=True):
            signal[s:s + n_fft] += chunk
        signal /= norm
        spectrum = np.fft.rfft(np.stack([signal[s:s + n_fft] * window for s in starts]), axis=1).T
        phase = np.exp(1j * np.angle(spectrum))
    target = int(config.sample_rate * config.clip_seconds)
    return np.pad(signal, (0, max(0, target - length)))[:target]


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


def payload_type_of(payload: bytes, declared: str | None) -> str:
    """The payload's media type: as the app declared it, else recognised by its first bytes (PNG, JPEG, GIF, WAV,
    WebP); empty when neither says."""
    if declared:
        return declared
    if payload[:4] == b"RIFF" and payload[8:12] in (b"WAVE", b"WEBP"):
        return "audio/wav" if payload[8:12] == b"WAVE" else "image/webp"
    return next((kind for magic, kind in _MAGIC if payload.startswith(magic)), "")


def _media_for(row: dict[str, Any], sample: int, samples: int, manifest: Manifest, media: Media) -> str:
    """The sample's media as a data URI: the app's payload when it fits (module docstring), else the rendering."""
    payload_type = payload_type_of(row["payload"], row.get("payload_type")) if row.get("payload") else ""
    if row.get("payload") and samples == 1 and payload_type.startswith(f"{media.key}/"):
        return data_uri(row["payload"], payload_type)
    inputs = row["inputs"]
    name = manifest.inputs[0].name if manifest.inputs else inputs[0]["name"]
    tensor = tensor_array(next((t for t in inputs if t["name"] == name), inputs[0]))
    if media.tag == "Audio":
        return data_uri(render_audio(tensor[sample], manifest), "audio/wav")
    return data_uri(render_image(tensor[sample], manifest), "image/png")


def export_tasks(store: ObjectStore, layout: DatasetLayout, manifests: Manifests, model: str, *,
                 unlabelled_only: bool = False) -> tuple[list[dict[str, Any]], str]:
    """The Label Studio tasks for every captured sample of ``model`` (with ``unlabelled_only``, skipping items with
    a label from any source: joined on the device, a device label record, a cloud label), and the labelling config
    of the newest version they name."""
    tasks: list[dict[str, Any]] = []
    config_of: Manifest | None = None
    captures, requests = labelled_elsewhere(store, layout, model) if unlabelled_only else (set(), set())
    for ref, row in iter_items(store, layout, model, EXPORT_COLUMNS):
        if unlabelled_only and (row["label"] is not None or row["capture_id"] in captures
                                or (ref.device, row["request_id"]) in requests):
            continue
        manifest = manifests.get(model, row["version"])
        if manifest is None:
            raise ConfigError(f"capture {row['capture_id']} names {model}/{row['version']}, whose manifest is not in "
                              f"s3://{store.bucket}: cannot tell its classes")
        config = labelling_config(manifest)
        if config_of is not None and labelling_config(config_of) != config:
            raise ConfigError(f"{model}: versions {config_of.version} and {manifest.version} have different classes "
                              f"or media; export them apart (one Label Studio project per labelling config)")
        config_of = manifest if config_of is None or manifest.created_at > config_of.created_at else config_of
        scores = class_scores(manifest, row["outputs"])
        if scores is None:
            raise ConfigError(f"capture {row['capture_id']}: its outputs hold no class scores to pre-annotate")
        media = media_of(manifest)
        for sample, probabilities in enumerate(scores):
            top = int(probabilities.argmax())
            tasks.append({
                "data": {media.key: _media_for(row, sample, len(scores), manifest, media),
                         "capture_id": row["capture_id"]},
                "predictions": [{"model_version": f"{model}/{row['version']}", "score": float(probabilities[top]),
                                 "result": [{"from_name": FROM_NAME, "to_name": media.key, "type": "choices",
                                             "value": {"choices": [class_name(manifest, top)]}}]}],
                "meta": {"capture_id": row["capture_id"], "sample": sample, "device_id": ref.device,
                         "request_id": row["request_id"], "version": row["version"], "policy": row["policy"]},
            })
    if config_of is None:
        raise ConfigError(f"no captured items of {model!r} to export" + (" (all labelled)" if unlabelled_only else ""))
    return tasks, labelling_config(config_of)


def _when(annotation: dict[str, Any]) -> datetime:
    text = str(annotation.get("updated_at") or annotation.get("created_at") or "")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _task_record(task: object, where: str, model: str, labels_of: dict[str, list[str]]) -> LabelRecord | None:
    """The label record a task of the export gives (None: not annotated, or every annotation cancelled)."""
    if not isinstance(task, dict):
        raise ConfigError(f"{where}: not a Label Studio task (a JSON object)")
    meta = task.get("meta") if isinstance(task.get("meta"), dict) else {}
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    capture_id = meta.get("capture_id") or data.get("capture_id")
    if not isinstance(capture_id, str) or not re.fullmatch(CAPTURE_ID_PATTERN, capture_id):
        raise ConfigError(f"{where}: no capture id in meta.capture_id or data.capture_id: not a task "
                          f"`edgeloop data export-labelstudio` wrote")
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None
    annotation = max(done, key=_when)
    choices = [r["value"]["choices"] for r in annotation.get("result") or []
               if isinstance(r, dict) and r.get("type") == "choices" and r.get("from_name") == FROM_NAME
               and isinstance(r.get("value"), dict) and isinstance(r["value"].get("choices"), list)]
    if not choices:
        return None  # annotated without choosing (e.g. only a comment): nothing to learn from
    if len(choices) != 1 or len(choices[0]) != 1:
        raise ConfigError(f"{where}: annotation {annotation.get('id')} chose {choices}: one class per sample")
    chosen = str(choices[0][0])
    version = str(meta.get("version", ""))
    labels = labels_of.get(version) or next(iter(labels_of.values()), [])
    if chosen not in labels:
        raise ConfigError(f"{where}: class {chosen!r} is not one of {model}'s classes ({', '.join(labels)})")
    return LabelRecord(
        capture_id=capture_id, sample=int(meta.get("sample", 0)), model=model, source="human",
        label=labels.index(chosen), class_name=chosen, time=_when(annotation),
        by=str(annotation.get("completed_by", "")),
        origin=f"label-studio task {task.get('id', '?')}, annotation {annotation.get('id', '?')}",
        device_id=str(meta.get("device_id", "")), request_id=str(meta.get("request_id", "")))


def read_export(path: Path, model: str, manifests: Manifests, versions: set[str]) -> list[LabelRecord]:
    """The human label records in a Label Studio JSON export (checked whole: a ConfigError names the first bad
    task; nothing is returned for a bad export). ``versions``: those whose class names apply (from the captures)."""
    try:
        tasks = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({type(exc).__name__}): export the project as JSON "
                          f"(Export → JSON) in Label Studio") from exc
    if not isinstance(tasks, list):
        raise ConfigError(f"{path}: a Label Studio JSON export is a list of tasks; this is a {type(tasks).__name__}")
    labels_of = {v: m.labels for v in sorted(versions) if (m := manifests.get(model, v)) is not None and m.labels}
    if not labels_of:
        raise ConfigError(f"no manifest of {model!r} with class names for the captured versions "
                          f"({', '.join(sorted(versions)) or 'none'})")
    records = [_task_record(task, f"{path} task {i}", model, labels_of) for i, task in enumerate(tasks)]
    return [r for r in records if r is not None]


def import_export(store: ObjectStore, layout: DatasetLayout, manifests: Manifests, model: str,
                  path: Path) -> list[str]:
    """Read a Label Studio JSON export and write its human labels (:func:`read_export`) for ``model``'s captured
    samples; every record must name a sample that is in the bucket's captures, else nothing is written. Returns the
    keys written."""
    from components.datasets import write_label_records

    captured: dict[str, tuple[str, int]] = {}  # capture id -> (version, samples)
    for _, row in iter_items(store, layout, model, ("capture_id", "version", "outputs")):
        scores = class_scores(manifests.get(model, row["version"]), row["outputs"])
        captured[row["capture_id"]] = (row["version"], len(scores) if scores is not None else 1)
    records = read_export(path, model, manifests, {version for version, _ in captured.values()})
    for record in records:
        found = captured.get(record.capture_id)
        if found is None or record.sample >= found[1]:
            raise ConfigError(f"{path}: {record.origin} labels capture {record.capture_id} sample {record.sample}, "
                              f"which is not among {model}'s captures in s3://{store.bucket}: wrong model or bucket?")
    return write_label_records(store, layout, records)
