"""Data sets for the pipeline: scikit-learn's digits (the default), an image folder (one folder per class) or Speech
Commands, from a local path or an S3 prefix, or the generated detection set; split deterministically into
train/val/test and saved as one ``.npz``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeloop_core.contract import Preprocessing
from edgeloop_core.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".webp"}
SYNTHETIC_DETECTION = "synthetic-detection"
"""The data URI of the generated detection set (:func:`load_synthetic_detection`)."""
SYNTHETIC_ACTIONS = "synthetic-actions"
"""The data URI of the generated action clips (:func:`load_synthetic_actions`)."""


@dataclass
class DatasetSplits:
    """Preprocessed float32 NCHW inputs (clips: NCTHW) and int64 labels for each split, plus what a client must
    know.

    ``x_field``/``y_field`` are the **field slice** (docs/flywheel.md): captured field samples held out of training
    (their devices' and capture groups' items are in no other split), labelled by an app or a person. Without field
    data they are empty arrays (``(0, *sample_shape)`` float32 and ``(0,)`` int64); passing ``None`` gives those.
    The field-train items, when there are any, are already mixed into ``x_train``/``y_train``; the lineage is in
    ``extra["field"]``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str]
    preprocessing: Preprocessing
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    x_field: np.ndarray | None = None
    y_field: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x_field is None:
            self.x_field = np.zeros((0, *self.x_test.shape[1:]), dtype=np.float32)
        if self.y_field is None:
            self.y_field = np.zeros((0,), dtype=np.int64)
        if len(self.x_field) != len(self.y_field):
            raise ConfigError(f"the field slice has {len(self.x_field)} inputs but {len(self.y_field)} labels")

    @property
    def has_field_slice(self) -> bool:
        """Whether a field slice is present (a run with field data and more than one connected group)."""
        return self.x_field is not None and len(self.x_field) > 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.labels)

    @property
    def task(self) -> str:
        """``classification`` (``y`` holds one class per sample) or ``detection`` (``y`` holds box tables, see
        :func:`components.detection_data.box_table`)."""
        return str(self.extra.get("task", "classification"))

    def fingerprint(self) -> str:
        """sha256 over every array and the labels: equal data gives an equal fingerprint. An empty field slice
        adds nothing, so data without field data keeps the fingerprint it had before the slice existed."""
        digest = hashlib.sha256()
        arrays = [self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test]
        if self.has_field_slice:
            arrays += [self.x_field, self.y_field]
        for array in arrays:
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(json.dumps(self.labels).encode())
        return digest.hexdigest()

    def save(self, path: str | Path) -> None:
        """Write one ``.npz`` (no pickles); the field slice only when it is not empty (the file is then the same as
        before the slice existed)."""
        field_arrays = {"x_field": self.x_field, "y_field": self.y_field} if self.has_field_slice else {}
        meta = {
            "labels": self.labels,
            "preprocessing": self.preprocessing.model_dump(mode="json"),
            "source": self.source,
            "extra": self.extra,
        }
        with open(path, "wb") as fh:
            np.savez(
                fh,
                x_train=self.x_train,
                y_train=self.y_train,
                x_val=self.x_val,
                y_val=self.y_val,
                x_test=self.x_test,
                y_test=self.y_test,
                **field_arrays,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            )

    @classmethod
    def load(cls, path: str | Path) -> DatasetSplits:
        """Read what :meth:`save` wrote (a file without a field slice, older ones included, loads with an empty
        one)."""
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
            arrays.update({k: npz[k] for k in ("x_field", "y_field") if k in npz.files})
        return cls(
            **arrays,
            labels=meta["labels"],
            preprocessing=Preprocessing.model_validate(meta["preprocessing"]),
            source=meta["source"],
            extra=meta.get("extra", {}),
        )


def split_dataset(
    x: np.ndarray, y: np.ndarray, *, seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, ...]:
    """Stratified, seeded split into ``(x_train, y_train, x_val, y_val, x_test, y_test)``."""
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    val_share = val_fraction / (1.0 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=seed + 1, stratify=y_rest
    )
    return x_train, y_train, x_val, y_val, x_test, y_test


def load_digits_dataset(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2) -> DatasetSplits:
    """scikit-learn's 8x8 handwritten digits (1,797 real images, 10 classes), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    parts = split_dataset(x, y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return DatasetSplits(
        *parts,
        labels=[str(d) for d in range(10)],
        preprocessing=Preprocessing(kind="image", layout="NCHW", scale=1 / 16, mean=[0.0], std=[1.0],
                                    params={"raw_range": "0..16 grey levels", "height": 8, "width": 8}),
        source="sklearn:digits",
    )


def _read_image_folder(root: Path, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"{root}: an image-folder data set needs at least two class folders, found {classes}")
    images, targets = [], []
    mode = "L" if channels == 1 else "RGB"
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"{root / name}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            try:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
                    array = np.asarray(img, dtype=np.float32)
            except (UnidentifiedImageError, OSError) as exc:
                raise ConfigError(f"{file}: not a readable image ({exc})") from exc
            images.append(array[None, :, :] if channels == 1 else array.transpose(2, 0, 1))
            targets.append(index)
    return np.stack(images) / 255.0, np.asarray(targets, dtype=np.int64), classes


@contextlib.contextmanager
def local_folder(uri: str, suffixes: set[str] | None = None) -> Iterator[Path]:
    """A local folder for ``uri``: the folder itself (path or ``file://``), or ``s3://bucket/prefix`` downloaded
    into a temporary folder (only files ending in ``suffixes`` when given) that is removed afterwards.

    S3 uses boto3's usual configuration (``AWS_ENDPOINT_URL_S3`` for a non-AWS endpoint).
    """
    if not uri.startswith("s3://"):
        root = Path(uri.removeprefix("file://")).expanduser()
        if not root.is_dir():
            raise ConfigError(f"{uri}: not a directory")
        yield root
        return
    from edgeloop_core.store import ObjectStore

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    store = ObjectStore(bucket)
    keys = [k for k in store.list_keys(prefix) if suffixes is None or Path(k).suffix.lower() in suffixes]
    if not keys:
        raise ConfigError(f"{uri}: no {'matching files' if suffixes else 'objects'} under that prefix")
    with tempfile.TemporaryDirectory(prefix="edgeloop-data-") as tmp:
        for key in keys:
            store.download_file(key, Path(tmp) / key[len(prefix) :])
        yield Path(tmp)


def _image_folder_splits(root: Path, source: str, *, image_size: int, channels: int, seed: int,
                         val_fraction: float, test_fraction: float) -> DatasetSplits:
    x, y, classes = _read_image_folder(root, image_size, channels)
    parts = split_dataset(x, y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return DatasetSplits(
        *parts,
        labels=classes,
        preprocessing=Preprocessing(
            kind="image", layout="NCHW", scale=1 / 255, mean=[0.0] * channels, std=[1.0] * channels,
            params={"height": image_size, "width": image_size, "resize": "bilinear"},
        ),
        source=source,
    )


def load_synthetic_detection(seed: int = 0, sizes: tuple[int, int, int] | None = None) -> DatasetSplits:
    """The generated detection set (:mod:`components.detection_data`: shapes on cluttered 64x64 backgrounds) as
    train/validation/test splits: ``x`` float32 ``[n, 1, 64, 64]`` in [0, 1], ``y`` box tables
    (:func:`~components.detection_data.box_table`). Each split comes from its own seed, so no image is in two splits
    and a split's images do not depend on the others' sizes (default :data:`~components.detection_data.SPLIT_SIZES`).
    """
    from components.detection_data import IMAGE_SIZE, MAX_OBJECTS, SHAPES, SPLIT_SIZES, box_table, generate

    parts = []
    for split, count in enumerate(sizes or SPLIT_SIZES):
        x, labels = generate(count, seed=[seed, split])
        parts += [x, box_table(labels)]
    return DatasetSplits(
        *parts,
        labels=list(SHAPES),
        preprocessing=Preprocessing(kind="image", layout="NCHW", scale=1 / 255, mean=[0.0], std=[1.0],
                                    params={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        source=SYNTHETIC_DETECTION,
        extra={"task": "detection", "image_size": IMAGE_SIZE, "max_objects": MAX_OBJECTS},
    )


def load_synthetic_actions(seed: int = 0, sizes: tuple[int, int, int] | None = None) -> DatasetSplits:
    """The generated action clips (:mod:`components.action_data`: an object that moves, turns, grows or stays over a
    cluttered, noisy background) as train/validation/test splits: ``x`` float32 ``[n, 1, 8, 32, 32]`` (``N, C, T, H,
    W``) in [0, 1], ``y`` action indices. Each split comes from its own seed, so no clip is in two splits (default
    :data:`~components.action_data.SPLIT_SIZES`).

    The preprocessing says how a client makes a clip: ``kind="image"`` per frame (pixel / 255), ``layout="NCTHW"``
    and the clip (:class:`~edgeloop_core.contract.Clip`: frames, frame rate, stride, layout)."""
    from components.action_data import ACTIONS, FPS, FRAME_SIZE, FRAMES, SPLIT_SIZES, generate
    from edgeloop_core.contract import Clip

    parts = []
    for split, count in enumerate(sizes or SPLIT_SIZES):
        parts += list(generate(count, seed=[seed, split]))
    return DatasetSplits(
        *parts,
        labels=list(ACTIONS),
        preprocessing=Preprocessing(kind="image", layout="NCTHW", scale=1 / 255, mean=[0.0], std=[1.0],
                                    params={"height": FRAME_SIZE, "width": FRAME_SIZE},
                                    clip=Clip(frames=FRAMES, fps=FPS, layout="NCTHW")),
        source=SYNTHETIC_ACTIONS,
    )


def load_image_folder(
    uri: str,
    *,
    image_size: int = 32,
    channels: int = 1,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> DatasetSplits:
    """An image folder, ``<root>/<class>/<image>``, from a local path or ``s3://bucket/prefix``.

    Images are resized to ``image_size`` squared, converted to ``channels`` (1 or 3) and scaled to [0, 1].
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    with local_folder(uri, IMAGE_SUFFIXES) as root:
        return _image_folder_splits(root, uri, image_size=image_size, channels=channels, seed=seed,
                                    val_fraction=val_fraction, test_fraction=test_fraction)


SPEECH_COMMANDS_MARKERS = ("validation_list.txt", "testing_list.txt", "_background_noise_")


def is_speech_commands(root: Path) -> bool:
    """A Google Speech Commands layout: keyword folders of WAVs plus its split lists or noise folder."""
    return any((root / marker).exists() for marker in SPEECH_COMMANDS_MARKERS)


def load_speech_commands(root: str | Path, *, seed: int = 0, noisy_copies: int = 1,
                         snr_db: tuple[float, float] = (5.0, 20.0)) -> DatasetSplits:
    """Keyword spotting from the Speech Commands layout (``<word>/<clip>.wav``, 16 kHz mono, 1 s).

    ``validation_list.txt`` and ``testing_list.txt`` (paths relative to ``root``) pick the held-out clips; the rest
    train. Each training clip is used clean and ``noisy_copies`` times mixed with a random stretch of a
    ``_background_noise_`` recording at a random SNR. Clips become log-mel spectrograms (:mod:`edgeloop_core.features`),
    normalised with the training set's mean and standard deviation (recorded in the preprocessing).
    """
    from edgeloop_core.features import MelConfig, fit_length, log_mel, read_wav

    root = Path(root)
    config = MelConfig()
    words = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    if len(words) < 2:
        raise ConfigError(f"{root}: a Speech Commands folder needs at least two keyword folders, found {words}")

    def listed(name: str) -> set[str]:
        path = root / name
        return {line.strip() for line in path.read_text().splitlines() if line.strip()} if path.exists() else set()

    validation, testing = listed("validation_list.txt"), listed("testing_list.txt")
    noises = [read_wav(p, config) for p in sorted((root / "_background_noise_").glob("*.wav"))]
    rng = np.random.default_rng(seed)
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for label, word in enumerate(words):
        for clip in sorted((root / word).glob("*.wav")):
            relative = f"{word}/{clip.name}"
            split = "val" if relative in validation else "test" if relative in testing else "train"
            samples = fit_length(read_wav(clip, config), config)
            xs, ys = splits[split]
            xs.append(log_mel(samples, config))
            ys.append(label)
            if split == "train":
                for _ in range(noisy_copies if noises else 0):
                    noise = noises[rng.integers(len(noises))]
                    start = rng.integers(0, max(1, len(noise) - len(samples)))
                    segment = fit_length(noise[start : start + len(samples)], config)
                    snr = rng.uniform(*snr_db)
                    gain = np.sqrt((samples ** 2).mean() / max((segment ** 2).mean(), 1e-12) / 10 ** (snr / 10))
                    xs.append(log_mel(samples + gain * segment, config))
                    ys.append(label)
    if not splits["train"][0] or not splits["test"][0] or not splits["val"][0]:
        raise ConfigError(f"{root}: need clips in train, validation_list.txt and testing_list.txt")
    arrays = {k: (np.stack(v[0]).astype(np.float32), np.asarray(v[1], dtype=np.int64)) for k, v in splits.items()}
    mean, std = float(arrays["train"][0].mean()), float(arrays["train"][0].std() or 1.0)
    norm = {k: ((x - mean) / std, y) for k, (x, y) in arrays.items()}
    return DatasetSplits(
        *norm["train"], *norm["val"], *norm["test"],
        labels=words,
        preprocessing=Preprocessing(kind="spectrogram", layout="NCHW", scale=1.0, mean=[mean], std=[std],
                                    params={**config.to_params(), "features": "log-mel, natural log, +1e-6"}),
        source=str(root),
        extra={"noisy_copies": noisy_copies},
    )


def load_dataset(uri: str, *, seed: int = 0, image_size: int = 32, channels: int = 1) -> DatasetSplits:
    """Dispatch on ``uri``: ``digits`` (or ``sklearn:digits``); ``synthetic-detection`` (shapes on cluttered
    64x64 backgrounds with box labels, :mod:`components.detection_data`); ``synthetic-actions`` (8-frame 32x32
    clips of seven actions, :mod:`components.action_data`); otherwise a folder — local, ``file://...``
    or an ``s3://`` prefix (downloaded once) — in the Speech Commands layout or an image folder. ``image_size`` and
    ``channels`` apply to image folders only."""
    if uri in ("digits", "sklearn:digits"):
        return load_digits_dataset(seed=seed)
    if uri == SYNTHETIC_DETECTION:
        return load_synthetic_detection(seed=seed)
    if uri == SYNTHETIC_ACTIONS:
        return load_synthetic_actions(seed=seed)
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    with local_folder(uri) as root:
        if is_speech_commands(root):
            data = load_speech_commands(root, seed=seed)
            data.source = uri
            return data
        return _image_folder_splits(root, uri, image_size=image_size, channels=channels, seed=seed,
                                    val_fraction=0.15, test_fraction=0.2)


def calibration_indices(labels: np.ndarray | None, count: int, *, seed: int = 0,
                        total: int | None = None) -> np.ndarray:
    """Indices of a calibration sample of at most ``count`` rows that represents the data.

    With ``labels``: stratified, each class in proportion to its share of the rows, and every class at least once
    when ``count`` allows (a training split ordered by class must not calibrate on one class). Without labels
    (``total`` rows, unlabelled data), or with detection box tables (``[rows, objects, 5]``, several classes per
    row): a seeded random sample. The indices come back shuffled, so a calibrator that stops early still sees every
    class.
    """
    rng = np.random.default_rng(seed)
    if labels is not None and np.ndim(labels) > 1:  # detection box tables: no one class per row to stratify by
        labels, total = None, len(labels)
    n = len(labels) if labels is not None else int(total or 0)
    if count <= 0:
        raise ConfigError(f"the calibration sample size must be positive, got {count}")
    if n == 0:
        raise ConfigError("there are no rows to calibrate on")
    if count >= n:
        return rng.permutation(n)
    if labels is None:
        return rng.choice(n, size=count, replace=False)
    classes, inverse = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    shares = np.array([len(m) for m in members], dtype=np.float64) * count / n
    quota = np.floor(shares).astype(int)
    if count >= len(classes):
        quota = np.maximum(quota, 1)
    # hand out what rounding left over to the classes with the largest remainders, never past a class's size
    for c in np.argsort(-(shares - np.floor(shares)), kind="stable"):
        if quota.sum() >= count:
            break
        quota[c] += 1
    while quota.sum() > count:
        quota[int(np.argmax(quota))] -= 1
    quota = np.minimum(quota, [len(m) for m in members])
    picked = np.concatenate([rng.choice(m, size=q, replace=False)
                             for m, q in zip(members, quota, strict=True) if q > 0])
    return rng.permutation(picked)


def class_histogram(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    """Rows per class name (for the report: what the calibration saw); objects per class for detection box tables
    (``[rows, objects, 5]``, class first, -1 for an unused slot)."""
    if np.ndim(labels) > 1:
        classes = np.asarray(labels)[..., 0]
        labels = classes[classes >= 0]
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}
