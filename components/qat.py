"""INT8 quantization-aware training with NVIDIA Model Optimizer: calibrate, then fine-tune with fake quantizers.

The result exports to ONNX QuantizeLinear/DequantizeLinear pairs, which TensorRT turns into INT8 kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from components.data import DatasetSplits, calibration_indices
from components.train import TrainHistory, fit, pick_device, seed_everything


def quantize_aware_train(
    model: nn.Module,
    data: DatasetSplits,
    *,
    epochs: int = 3,
    lr: float = 2e-4,
    calibration_samples: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, TrainHistory]:
    """Insert INT8 quantizers (per-channel weights, per-tensor activations), calibrate on a stratified sample of
    the training data (:func:`components.data.calibration_indices`: every class, in proportion), fine-tune.

    Returns the quantized model (in place) and the fine-tuning history.
    """
    import modelopt.torch.quantization as mtq

    seed_everything(seed)
    device = pick_device()
    model.to(device)
    rows = calibration_indices(data.y_train, calibration_samples, seed=seed)
    calibration = torch.from_numpy(data.x_train[rows]).to(device)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for start in range(0, len(calibration), 64):
                m(calibration[start : start + 64])

    model.eval()
    model = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)
    history = fit(model, data, epochs=epochs, lr=lr, seed=seed, desc="QAT fine-tune", progress=progress)
    return model, history
