"""ResNet-18 (He et al., CVPR 2016) for frames and spectrograms, as in the OGM-GE/MMPareto line.

OGM-GE (Peng et al., CVPR 2022) and its successors encode CREMA-D / Kinetics-Sounds with two
ResNet-18s trained from scratch: one on the log-magnitude spectrogram ``[1, F, T]``, one on video
frames, each frame through the same network and the features averaged over frames.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mmlearn.encoders.registry import (
    Encoder,
    EncoderExample,
    check_size,
    check_sizes,
    register_encoder,
)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) + self.shortcut(x)).relu()


@register_encoder("resnet18")
class ResNet18(Encoder):
    """ResNet-18: ``[B, C, H, W]`` or ``[B, T, C, H, W]`` (T frames) -> ``[B, out_dim]``.

    Stem (7x7 conv stride 2, max-pool), four stages of ``blocks`` BasicBlocks with ``width``,
    2x, 4x, 8x channels (stride 2 from the second stage), global average pooling, a linear
    projection to ``out_dim``. With frames, every frame goes through the same network and the
    pooled features are averaged over T.

    Args:
        input_shape: ``[C, H, W]`` or ``[T, C, H, W]``.
        out_dim: output feature size.
        width: channels of the first stage (64 in ResNet-18; smaller for quick runs).
        blocks: BasicBlocks per stage (ResNet-18: 2, 2, 2, 2).
    """

    ranks = (3, 4)

    @classmethod
    def example(cls) -> EncoderExample:
        return EncoderExample([2, 3, 20, 20], {"width": 4})  # two frames, narrow

    def __init__(
        self,
        input_shape: Sequence[int],
        out_dim: int,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        check_size("resnet18 encoder", "width", width)
        check_sizes("resnet18 encoder", "blocks", blocks, minimum=0)
        channels = int(input_shape[-3])
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        c = width
        for stage, n in enumerate(blocks):
            c_out = width * 2**stage
            for i in range(n):
                layers.append(BasicBlock(c, c_out, 2 if (i == 0 and stage > 0) else 1))
                c = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(c, out_dim)
        self.frames = len(input_shape) == 4
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        if self.frames:  # [B, T, C, H, W]: frames share the network, features averaged over T
            b, t = x.shape[:2]
            return self.proj(self.features(x.flatten(0, 1)).view(b, t, -1).mean(1))
        return self.proj(self.features(x))
