"""LeNet-style convolutional encoder for images, as used for AV-MNIST in I2M2 (NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmlearn.encoders.registry import (
    Encoder,
    EncoderExample,
    check_size,
    check_sizes,
    register_encoder,
)


@register_encoder("cnn")
class LeNetEncoder(Encoder):
    """``Conv(k) -> ReLU -> MaxPool(2)`` blocks, flatten, ``Linear -> ReLU``.

    ``[B, C, H, W] -> [B, out_dim]``. Convolutions are padded ("same"), and a block stops pooling
    once the feature map is smaller than 2x2, so small images (mfeat's 16x15 digits) work too.

    Args:
        input_shape: ``[C, H, W]``.
        out_dim: output feature size.
        channels: output channels of each conv block (LeNet: 6, 16; I2M2 doubles per layer).
        kernel_size: odd convolution kernel size.
    """

    ranks = (3,)

    @classmethod
    def example(cls) -> EncoderExample:
        return EncoderExample([1, 16, 15], {"channels": [4, 8]})  # odd sizes, as mfeat's digits

    def __init__(
        self,
        input_shape: Sequence[int],
        out_dim: int,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        check_sizes("cnn encoder", "channels", channels)
        check_size("cnn encoder", "kernel_size", kernel_size)
        c, h, w = (int(s) for s in input_shape)
        layers: list[nn.Module] = []
        for c_out in channels:
            layers += [nn.Conv2d(c, c_out, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.proj = nn.Sequential(nn.Linear(flat, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.features(x))
