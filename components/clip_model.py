"""A small (2+1)D convolutional network for action recognition on clips (``arch=r2plus1d``).

Input ``[batch, channels, frames, height, width]`` (``N, C, T, H, W``): the layout of PyTorch's ``Conv3d`` and of
ONNX's ``Conv`` over five dimensions, so the graph starts with a convolution, not a transpose that every backend
and both INT8 quantizers would have to carry.

Why (2+1)D: each block is a spatial ``Conv3d`` with a ``(1, 3, 3)`` kernel, then a temporal one with ``(3, 1, 1)``
(Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition", 2018) — a third of the weights
and FLOPs of a full ``3x3x3`` kernel, with a ReLU between the two halves. Every layer is a plain ``Conv`` +
``BatchNormalization`` (folded on export) + ``Relu``, which each tool of the loop handles as it is: Model
Optimizer's FastNAS prunes ``nn.Conv3d``/``nn.BatchNorm3d`` channels and its quantizer has ``QuantConv3d``;
ONNX Runtime's ``quantize_static`` wraps a 5-D ``Conv`` in Q/DQ like a 2-D one; TensorRT's convolution layer takes
3-D kernels (whether a given Jetson builds the INT8 Q/DQ variant with INT8 3-D kernels is for its engine build and
on-device validation to show: nothing here runs TensorRT). A temporal-shift design (TSM) would use only
``Conv2d``, but its shift slices the channel axis, which keeps FastNAS from pruning the convolutions it sits
between. Widths are multiples of 16 (FastNAS's channel step).
"""

from __future__ import annotations

import torch
from torch import nn


def _factorised(in_channels: int, out_channels: int, *, spatial_stride: int, temporal_stride: int) -> nn.Sequential:
    """A (2+1)D block: ``(1, 3, 3)`` spatial conv, BN, ReLU, then ``(3, 1, 1)`` temporal conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, spatial_stride, spatial_stride),
                  padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(),
        nn.Conv3d(out_channels, out_channels, (3, 1, 1), stride=(temporal_stride, 1, 1), padding=(1, 0, 0),
                  bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(),
    )


class R2Plus1D(nn.Module):
    """A spatiotemporal stem, then two (2+1)D blocks, global average pooling and a linear classifier.

    The stem is one full ``3 x 3 x 3`` convolution (16 channels, stride 2 in height and width): on a one-channel
    input it costs less than a factorised pair would (27 weights per output channel), and it sees motion at full
    resolution, where one pixel a frame is still a pixel. The blocks (32 and 64 channels) halve height and width,
    the last also the frames. 40 k parameters, 16 MFLOPs a clip of 8 x 32 x 32."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, 16, 3, stride=(1, 2, 2), padding=1, bias=False),
            nn.BatchNorm3d(16),
            nn.ReLU(),
            _factorised(16, 32, spatial_stride=2, temporal_stride=1),
            _factorised(32, 64, spatial_stride=2, temporal_stride=2),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():  # the exporter has no memory formats (and ONNX none to carry)
            # channels-last: PyTorch's CPU (oneDNN) 3-D convolutions run about twice as fast
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.classifier(self.features(x))
