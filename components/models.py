"""The model architectures the pipeline trains: a small CNN (the default), a small vision transformer, a small
anchor-free detector (:mod:`components.detector`) for detection data, and a small (2+1)D network for clips
(:mod:`components.clip_model`).

Layer widths are multiples of 16 so that Model Optimizer's FastNAS, which prunes channels in steps of its
``channel_divisor``, has room to cut FLOPs without touching depth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from edgeloop_core.errors import ConfigError

ARCHITECTURES = ("cnn", "vit", "ast", "detector", "r2plus1d")
DETECTION_ARCHITECTURES = ("detector",)
"""Architectures that detect (YOLOv8-layout outputs, trained on box tables); the others classify."""
CLIP_ARCHITECTURES = ("r2plus1d",)
"""Architectures that classify clips (``[batch, channels, frames, height, width]`` inputs); the others take images
or spectrograms."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an architecture before loading its weights."""

    arch: str
    in_channels: int
    image_size: int
    num_classes: int
    width: int | None = None
    """Input width when it differs from ``image_size`` (spectrograms: mel bins x frames)."""
    frames: int | None = None
    """Frames per clip (clip architectures only)."""

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        """Read what :meth:`save` wrote."""
        return cls(**json.loads(Path(path).read_text()))


class SmallCNN(nn.Module):
    """Three conv blocks (64, 128, 128 channels) and a 128-wide classifier head."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4, 128),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _Attention(nn.Module):
    """Multi-head self-attention written with plain Linear layers (quantizable, exports to plain ONNX ops)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (conv with stride = patch), learned position embeddings, a transformer encoder, mean pool."""

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, patch: int | tuple[int, int] = 2, dim: int = 64,
        depth: int = 2, heads: int = 4, mlp_dim: int = 128, width: int | None = None,
    ) -> None:
        super().__init__()
        height, width = image_size, width or image_size
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        if height % ph or width % pw:
            raise ConfigError(f"input {height}x{width} is not a multiple of the patch size {ph}x{pw}")
        self.embed = nn.Conv2d(in_channels, dim, (ph, pw), stride=(ph, pw))
        self.pos = nn.Parameter(torch.zeros(1, (height // ph) * (width // pw), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(_Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if n % d == 0)


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for ``spec``.

    ``ast`` is the audio spectrogram transformer: the same encoder as ``vit``, with rectangular patches over the
    (mel bins x frames) spectrogram, each at most 8x8 and dividing the input exactly (40x98 gives 8x7 patches).
    ``detector`` is :class:`components.detector.TinyDetector` (``num_classes`` object classes); ``r2plus1d`` is
    :class:`components.clip_model.R2Plus1D` (clips of ``frames`` frames).
    """
    if spec.arch == "cnn":
        return SmallCNN(spec.in_channels, spec.image_size, spec.num_classes)
    if spec.arch == "vit":
        return TinyViT(spec.in_channels, spec.image_size, spec.num_classes, width=spec.width)
    if spec.arch == "ast":
        width = spec.width or spec.image_size
        patch = (_largest_divisor(spec.image_size, 8), _largest_divisor(width, 8))
        return TinyViT(spec.in_channels, spec.image_size, spec.num_classes, patch=patch, width=width)
    if spec.arch == "detector":
        from components.detector import TinyDetector

        return TinyDetector(spec.in_channels, spec.image_size, spec.num_classes)
    if spec.arch == "r2plus1d":
        from components.clip_model import R2Plus1D

        return R2Plus1D(spec.in_channels, spec.num_classes)
    raise ConfigError(f"unknown architecture {spec.arch!r}: choose one of {', '.join(ARCHITECTURES)}")


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Inference FLOPs of one sample, as Model Optimizer counts them for its pruning constraint."""
    from modelopt.torch.nas.utils import inference_flops

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return int(inference_flops(model, dummy_input=torch.zeros(1, *input_shape, device=device), unit=1))
    finally:
        model.train(was_training)


def save_checkpoint(model: nn.Module, spec: ModelSpec, directory: str | Path) -> None:
    """Save ``spec.json`` and ``model.pth`` (Model Optimizer's format: architecture changes and quantizers too)."""
    import modelopt.torch.opt as mto

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec.save(directory / "spec.json")
    mto.save(model.cpu(), directory / "model.pth")  # CPU tensors: the next step may run without a GPU


def load_checkpoint(directory: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model saved by :func:`save_checkpoint` (pruned or quantized ones included), in eval mode."""
    import modelopt.torch.opt as mto

    directory = Path(directory)
    spec = ModelSpec.load(directory / "spec.json")
    model = mto.restore(build_model(spec), directory / "model.pth")
    return model.eval(), spec


TRAINING_CHECKPOINT_FORMAT = "edgeloop-training-checkpoint/1"
"""The ``format`` of the one-file training checkpoint a published version keeps for warm starts."""


def write_training_checkpoint(model_dir: str | Path, path: str | Path) -> Path:
    """Pack the dense FP32 model :func:`save_checkpoint` wrote in ``model_dir`` into one file: ``{"format",
    "spec", "state_dict"}`` with tensors only (so :func:`read_training_checkpoint` loads it with
    ``weights_only=True``: no pickled code runs when a checkpoint from the bucket is read)."""
    model, spec = load_checkpoint(model_dir)
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": TRAINING_CHECKPOINT_FORMAT, "spec": asdict(spec), "state_dict": state}, path)
    return path


def read_training_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelSpec]:
    """``(state_dict, spec)`` of a file :func:`write_training_checkpoint` wrote; :class:`ConfigError` (one line)
    for anything else."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if raw.get("format") != TRAINING_CHECKPOINT_FORMAT:
            raise ValueError(raw.get("format"))
        return dict(raw["state_dict"]), ModelSpec(**raw["spec"])
    except Exception as exc:  # torch raises many kinds for a foreign or damaged file
        raise ConfigError(f"{Path(path).name} is not an edgeloop training checkpoint "
                          f"({TRAINING_CHECKPOINT_FORMAT})") from exc
