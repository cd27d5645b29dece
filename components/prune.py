"""Structured pruning with NVIDIA Model Optimizer's FastNAS under a FLOPs or parameter budget, then fine-tuning."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from components.data import DatasetSplits
from components.train import TrainHistory, accuracy, fit, pick_device, seed_everything
from edgeloop_core.errors import ConfigError

CHANNEL_DIVISOR = 16
"""FastNAS keeps channel and feature counts multiples of this (Model Optimizer's default is 32)."""
FASTNAS_RULES = {
    "nn.Conv2d": {"*": {"channel_divisor": CHANNEL_DIVISOR}},
    "nn.Conv3d": {"*": {"channel_divisor": CHANNEL_DIVISOR}},  # the clip model's (2+1)D convolutions
    "nn.Linear": {"*": {"feature_divisor": CHANNEL_DIVISOR}},
    "nn.BatchNorm2d": {"*": {"feature_divisor": CHANNEL_DIVISOR}},
    "nn.BatchNorm3d": {"*": {"feature_divisor": CHANNEL_DIVISOR}},
    "nn.LayerNorm": {"*": {"feature_divisor": CHANNEL_DIVISOR}},
}
"""The search space FastNAS prunes in: every layer kind our architectures use, in steps of :data:`CHANNEL_DIVISOR`
(a kind left out falls back to Model Optimizer's coarser default)."""


@dataclass
class PruneResult:
    """What pruning did: budgets before and after, and fine-tuning history."""

    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    history: TrainHistory

    @property
    def flops_reduction(self) -> float:
        """Fraction of FLOPs removed, 0..1."""
        return 1.0 - self.flops_after / self.flops_before


def prune_model(
    model: nn.Module,
    data: DatasetSplits,
    *,
    constraint: str = "flops",
    keep_fraction: float = 0.6,
    finetune_epochs: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, PruneResult]:
    """Prune ``model`` (in place) to at most ``keep_fraction`` of its FLOPs or parameters, then fine-tune.

    FastNAS ranks sub-networks by validation accuracy (the score function) and recalibrates batch norms on the
    training set. The returned model carries Model Optimizer state; save it with
    :func:`components.models.save_checkpoint`.
    """
    import modelopt.torch.prune as mtp

    from components.models import count_flops, count_params

    if constraint not in ("flops", "params"):
        raise ConfigError(f"pruning constraint must be 'flops' or 'params', got {constraint!r}")
    if not 0.05 <= keep_fraction < 1.0:
        raise ConfigError(f"keep_fraction must be in [0.05, 1), got {keep_fraction}")
    seed_everything(seed)
    device = pick_device()
    model.to(device)
    dummy = torch.zeros(1, *data.input_shape, device=device)
    flops_before, params_before = count_flops(model, data.input_shape), count_params(model)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(data.x_train).to(device),
                                       torch.from_numpy(data.y_train).to(device)),
        batch_size=128,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    mode = [("fastnas", FASTNAS_RULES)]
    with tempfile.TemporaryDirectory(prefix="edgeloop-prune-") as tmp:
        model.eval()
        try:
            model, _ = mtp.prune(
                model=model,
                mode=mode,
                constraints={constraint: f"{keep_fraction * 100:.0f}%"},
                dummy_input=dummy,
                config={
                    "data_loader": loader,
                    "score_func": lambda m: accuracy(m, data.x_val, data.y_val),
                    "checkpoint": str(Path(tmp) / "fastnas_search.pth"),
                    "verbose": False,
                },
            )
        except ValueError as exc:  # Model Optimizer's "no subnet satisfies the constraint" (with a table)
            raise ConfigError(
                f"FastNAS found no sub-network within {keep_fraction:.0%} of the {constraint}: raise "
                "prune_keep_fraction (the log shows the smallest reachable size)"
            ) from exc
    history = fit(model, data, epochs=finetune_epochs, lr=lr, seed=seed, desc="prune fine-tune", progress=progress)
    result = PruneResult(
        flops_before=flops_before,
        flops_after=count_flops(model, data.input_shape),
        params_before=params_before,
        params_after=count_params(model),
        history=history,
    )
    return model, result
