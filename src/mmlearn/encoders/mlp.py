"""Multi-layer perceptron encoder for feature vectors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mmlearn.encoders.registry import (
    Encoder,
    EncoderExample,
    check_probability,
    check_sizes,
    register_encoder,
)


def mlp_layers(dims: Sequence[int], dropout: float = 0.0) -> list[nn.Module]:
    """``Linear -> ReLU (-> Dropout)`` for each consecutive pair in ``dims``."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return layers


@register_encoder("mlp")
class MLPEncoder(Encoder):
    """Flatten, then ``Linear -> ReLU`` blocks: ``[B, *shape] -> [B, out_dim]``.

    Args:
        input_shape: any shape; it is flattened to ``prod(input_shape)`` features.
        out_dim: output feature size.
        hidden: sizes of the hidden layers before the output layer.
        dropout: dropout after each block.
    """

    ranks = (1, 2, 3)

    @classmethod
    def example(cls) -> EncoderExample:
        return EncoderExample([12], {"hidden": [32]})

    def __init__(
        self,
        input_shape: Sequence[int],
        out_dim: int,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_sizes("mlp encoder", "hidden", hidden)
        check_probability("mlp encoder", "dropout", dropout)
        d_in = 1
        for s in input_shape:
            d_in *= int(s)
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Flatten(), *mlp_layers([d_in, *hidden, out_dim], dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
