"""Recurrent encoder for sequences (time series, spectrogram frames, pre-extracted features)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mmlearn.encoders.registry import Encoder, EncoderExample, check_size, register_encoder


@register_encoder("gru")
class GRUEncoder(Encoder):
    """GRU over time, last hidden state (both directions if bidirectional), ``Linear -> ReLU``.

    ``[B, T, D] -> [B, out_dim]``.

    Args:
        input_shape: ``[T, D]`` (T may differ between batches; only D is used).
        out_dim: output feature size.
        hidden: GRU hidden size.
        num_layers: stacked GRU layers.
        bidirectional: run the sequence both ways and concatenate the final states.
    """

    ranks = (2,)

    @classmethod
    def example(cls) -> EncoderExample:
        return EncoderExample([7, 5], {"hidden": 8, "num_layers": 2, "bidirectional": True})

    def __init__(
        self,
        input_shape: Sequence[int],
        out_dim: int,
        hidden: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        check_size("gru encoder", "hidden", hidden)
        check_size("gru encoder", "num_layers", num_layers)
        self.gru = nn.GRU(
            int(input_shape[1]), hidden, num_layers, batch_first=True, bidirectional=bidirectional
        )
        self.proj = nn.Sequential(
            nn.Linear(hidden * (2 if bidirectional else 1), out_dim), nn.ReLU()
        )
        self.out_dim = out_dim
        self.directions = 2 if bidirectional else 1

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)  # h: [layers * directions, B, hidden]
        last = h[-self.directions :].transpose(0, 1).reshape(x.shape[0], -1)
        return self.proj(last)
