"""Training: the FP32 baseline, and the fine-tuning loop that pruning and QAT reuse."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from components.data import DatasetSplits
from components.detection_data import is_box_table
from components.models import ARCHITECTURES, CLIP_ARCHITECTURES, DETECTION_ARCHITECTURES, ModelSpec, build_model
from edgeloop_core.errors import ConfigError, ManifestInvalid

CHECKPOINT_FILE = "training/checkpoint.pt"
"""Where a published version keeps its FP32 training checkpoint, under its version prefix (cloud-only: not in the
manifest's files, so devices never download it)."""


@dataclass
class TrainHistory:
    """Per-epoch metrics of one :func:`fit` call."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    metric: str = "val_accuracy"
    """The validation figure logged each epoch: ``val_accuracy`` (classifiers) or ``val_map50`` (detectors)."""

    @property
    def final_val_accuracy(self) -> float:
        """Validation accuracy after the last epoch (0 when nothing ran)."""
        return self.epochs[-1]["val_accuracy"] if self.epochs else 0.0

    @property
    def final_val_score(self) -> float:
        """The validation figure (:attr:`metric`) after the last epoch, 0..1 (0 when nothing ran)."""
        return self.epochs[-1][self.metric] if self.epochs else 0.0


def pick_device() -> torch.device:
    """CUDA when the step got a GPU (``--train-gpus`` on a cluster), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live."""
    return next(model.parameters()).device


def seed_everything(seed: int) -> None:
    """Seed torch and numpy; single-threaded-deterministic enough for CPU runs."""
    torch.manual_seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of ``model`` (eval mode) for the numpy batch ``x``."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    outputs = [model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu().numpy()
               for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return np.concatenate(outputs)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The task's score in [0, 1]: top-1 accuracy against class labels; against detection box tables
    (:func:`components.detection_data.is_box_table`), COCO mAP@0.5 after decoding and NMS. Pruning ranks
    sub-networks by it."""
    if is_box_table(y):
        from components.detector import detection_scores

        return detection_scores(predict(model, x), y, x.shape[-1])[0]
    return float((predict(model, x).argmax(axis=1) == y).mean())


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A one-cycle schedule (warm-up over 20% of the steps, then cosine down) to ``lr``; a constant ``lr`` for runs of
    fewer than 3 steps. PyTorch's OneCycleLR divides by the warm-up's length minus one step, so a run of exactly 5
    steps (20% of 5 = 1) fails with ZeroDivisionError: the warm-up is made at least 2 steps long."""
    if total_steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                               pct_start=max(0.2, 2.0 / total_steps))


def fit(
    model: nn.Module,
    data: DatasetSplits,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
) -> TrainHistory:
    """Train ``model`` in place with AdamW and a cosine schedule; log loss and accuracy per epoch.

    On detection data (box tables) the loss is :func:`components.detector.detection_loss` and the figure logged
    per epoch is the validation mAP@0.5 (``val_map50``)."""
    if epochs < 0 or lr <= 0 or batch_size <= 0:
        raise ConfigError(f"need epochs >= 0, lr > 0 and batch_size > 0 (got {epochs}, {lr}, {batch_size})")
    detection = is_box_table(data.y_train)
    if detection:
        from components.detector import detection_loss
    history = TrainHistory(metric="val_map50" if detection else "val_accuracy")
    if epochs == 0:
        return history
    generator = torch.Generator().manual_seed(seed)
    device = pick_device()
    model.to(device)
    x_train, y_train = torch.from_numpy(data.x_train).to(device), torch.from_numpy(data.y_train).to(device)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = one_cycle(optimizer, lr, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    bar = tqdm(range(epochs), desc=desc, disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].to(device)
            optimizer.zero_grad(set_to_none=True)
            if detection:
                loss = detection_loss(model, x_train[idx], y_train[idx])
            else:
                loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        metrics = {
            "epoch": float(epoch + 1),
            "train_loss": total / seen,
            history.metric: accuracy(model, data.x_val, data.y_val),
        }
        history.epochs.append(metrics)
        if detection:
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_map50=f"{metrics['val_map50']:.3f}")
        else:
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_acc=f"{metrics['val_accuracy']:.3f}")
    model.eval()
    return history


def train_model(
    data: DatasetSplits, *, arch: str = "cnn", epochs: int = 15, lr: float = 3e-3, seed: int = 0,
    progress: bool = True, warm_start: WarmStart | None = None,
) -> tuple[nn.Module, ModelSpec, TrainHistory]:
    """Train the FP32 baseline of ``arch`` on ``data``: a detector (:data:`DETECTION_ARCHITECTURES`) on detection
    data, a clip classifier (:data:`CLIP_ARCHITECTURES`) on clips (``[n, channels, frames, height, width]``), an
    image classifier on the rest. With ``warm_start`` (:func:`fetch_warm_start`) training starts from the deployed
    version's weights (same schedule) instead of a fresh initialisation."""
    clips = len(data.input_shape) == 4
    kind = "detection" if data.task == "detection" else "clip" if clips else "classification"

    def kind_of(a: str) -> str:
        return "detection" if a in DETECTION_ARCHITECTURES else "clip" if a in CLIP_ARCHITECTURES else "classification"

    if kind_of(arch) != kind:
        fitting = [a for a in ARCHITECTURES if kind_of(a) == kind]
        raise ConfigError(f"{data.source} is {kind} data, which arch {arch!r} cannot learn: set arch to one of "
                          f"{', '.join(fitting)}")
    seed_everything(seed)
    channels, *frames, height, width = data.input_shape
    spec = ModelSpec(arch=arch, in_channels=channels, image_size=height, num_classes=data.num_classes,
                     width=None if width == height else width, frames=frames[0] if frames else None)
    model = build_model(spec)
    if warm_start is not None:
        warm_start.apply(model, spec, data.labels)
    history = fit(model, data, epochs=epochs, lr=lr, seed=seed, desc=f"train {arch}", progress=progress)
    return model, spec, history


@dataclass(frozen=True)
class WarmStart:
    """The deployed version's training checkpoint, verified: where it came from and its weights."""

    version: str
    checkpoint_sha256: str
    spec: ModelSpec
    labels: list[str]
    state_dict: dict[str, torch.Tensor] = field(repr=False)

    def lineage(self) -> dict[str, str]:
        """What the manifest's ``training.warm_start`` records."""
        return {"version": self.version, "checkpoint_sha256": self.checkpoint_sha256}

    def apply(self, model: nn.Module, spec: ModelSpec, labels: list[str]) -> None:
        """Load the weights into ``model`` (built from ``spec``); one :class:`ConfigError` line when the checkpoint
        does not fit: another architecture, input or class list."""
        def shape(s: ModelSpec) -> str:
            size = f"{s.image_size}x{s.width or s.image_size}"
            return f"arch {s.arch}, input {s.in_channels}x{f'{s.frames}x' if s.frames else ''}{size}"

        if (self.spec, self.labels) != (spec, labels):
            ours, theirs = f"{shape(spec)}, {len(labels)} classes", f"{shape(self.spec)}, {len(self.labels)} classes"
            if ours == theirs:
                ours, theirs = f"classes {labels}", f"classes {self.labels}"
            raise ConfigError(f"warm start: the deployed {self.version} was trained as {theirs}, this run trains "
                              f"{ours}: set warm_start=false to train from scratch")
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise ConfigError(f"warm start: the checkpoint of {self.version} does not fit {shape(spec)} "
                              f"({str(exc).splitlines()[0]})") from exc


def fetch_warm_start(*, model_name: str, bucket: str, prefix: str, s3_endpoint: str, channel: str,
                     workdir: str | Path) -> WarmStart:
    """Download and verify the training checkpoint of the version ``channel`` points at: signed pointer and
    manifest (:func:`components.plan.verified_deployed`), then the checkpoint's size and sha256 against the
    manifest's ``training.checkpoint``. Each refusal is one line (no version, no checkpoint, a changed file)."""
    from components.models import read_training_checkpoint
    from components.plan import verified_deployed
    from edgeloop_core.contract import ArtifactLayout, FileRef, verify_file
    from edgeloop_core.store import ObjectStore

    store, layout = ObjectStore(bucket, endpoint_url=s3_endpoint or None), ArtifactLayout(prefix)
    deployed = verified_deployed(store, layout, model_name, channel)
    ref = deployed.manifest.training.get("checkpoint")
    if not isinstance(ref, dict) or not ref.get("key"):
        raise ConfigError(f"warm start: the deployed {model_name}/{deployed.version} has no training checkpoint "
                          f"(published before warm starts, or imported): set warm_start=false for one run")
    expected = layout.file_key(model_name, deployed.version, CHECKPOINT_FILE)
    if ref["key"] != expected:
        raise ManifestInvalid(f"{model_name}/{deployed.version}: training.checkpoint names {ref['key']!r}, "
                              f"not {expected!r}: refusing it")
    try:
        file_ref = FileRef(file=CHECKPOINT_FILE, sha256=str(ref.get("sha256", "")), size_bytes=ref.get("size_bytes"))
    except ValueError as exc:
        raise ManifestInvalid(f"{model_name}/{deployed.version}: training.checkpoint has no valid sha256 and size: "
                              f"refusing it") from exc
    verify_file(store.download_file(expected, Path(workdir) / "checkpoint.pt"), file_ref)
    local = Path(workdir) / "checkpoint.pt"
    state, spec = read_training_checkpoint(local)
    return WarmStart(deployed.version, str(ref["sha256"]), spec, list(deployed.manifest.labels), state)
