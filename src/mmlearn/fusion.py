"""Fusions: features of all modalities ``{m: [B, d_m]}`` -> one joint feature ``[B, out_dim]``.

``concat`` and ``sum`` are the late-fusion baselines; ``lrtf`` is low-rank multimodal (tensor)
fusion, Liu et al., "Efficient Low-rank Multimodal Fusion with Modality-Specific Factors", ACL 2018,
the fusion I2M2 uses on AV-MNIST. Modality order is the order of ``in_dims``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmlearn.errors import MMLearnError, is_int


class Fusion(nn.Module):
    """Base class; ``out_dim`` is the joint feature size."""

    out_dim: int

    def __init__(
        self, in_dims: Mapping[str, int], out_dim: int | None = None, rank: int = 4
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not in_dims:
            raise MMLearnError(f"{name}: no modalities to fuse; expected at least one feature size")
        bad = {m: d for m, d in in_dims.items() if not is_int(d, 1)}
        if bad:
            raise MMLearnError(f"{name}: feature sizes {bad}; expected integers >= 1")
        if out_dim is not None and not is_int(out_dim, 1):
            raise MMLearnError(f"{name}: out_dim={out_dim!r}; expected an integer >= 1 (or null)")
        if not is_int(rank, 1):
            raise MMLearnError(f"{name}: rank={rank!r}; expected an integer >= 1")
        self.modalities = list(in_dims)


class ConcatFusion(Fusion):
    """``cat([f_1, ..., f_M], dim=1)``: ``out_dim = sum_m d_m``."""

    def __init__(self, in_dims: Mapping[str, int], out_dim: int | None = None, rank: int = 4):
        super().__init__(in_dims, out_dim, rank)
        self.out_dim = sum(in_dims.values())

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([features[m] for m in self.modalities], dim=1)


class SumFusion(Fusion):
    """``sum_m f_m``; all modalities must have the same feature size."""

    def __init__(self, in_dims: Mapping[str, int], out_dim: int | None = None, rank: int = 4):
        super().__init__(in_dims, out_dim, rank)
        dims = set(in_dims.values())
        if len(dims) != 1:
            raise MMLearnError(f"fusion 'sum' needs equal feature sizes, got {dict(in_dims)}")
        self.out_dim = dims.pop()

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([features[m] for m in self.modalities]).sum(0)


class LowRankTensorFusion(Fusion):
    """Low-rank tensor fusion (Liu et al., ACL 2018, eq. 6-7).

    ``h = sum_r w_r * prod_m ([f_m, 1] @ W_m^(r)) + b`` with modality factors
    ``W_m: [rank, d_m + 1, out_dim]``; the appended 1 keeps the unimodal and lower-order terms of
    the full outer-product tensor.
    """

    def __init__(self, in_dims: Mapping[str, int], out_dim: int | None = None, rank: int = 4):
        super().__init__(in_dims, out_dim, rank)
        self.out_dim = out_dim or max(in_dims.values())
        self.factors = nn.ParameterDict(
            {
                m: nn.Parameter(torch.empty(rank, d + 1, self.out_dim).normal_(0, (d + 1) ** -0.5))
                for m, d in in_dims.items()
            }
        )
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(self.out_dim))

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        fused: Tensor | None = None
        for m in self.modalities:
            f = features[m]
            f1 = torch.cat([f, f.new_ones(f.shape[0], 1)], dim=1)  # [B, d+1]
            proj = torch.einsum("bd,rdo->rbo", f1, self.factors[m])  # [rank, B, out]
            fused = proj if fused is None else fused * proj
        assert fused is not None
        return torch.einsum("r,rbo->bo", self.rank_weights, fused) + self.bias


FUSIONS: dict[str, type[Fusion]] = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "lrtf": LowRankTensorFusion,
}


def build_fusion(
    name: str, in_dims: Mapping[str, int], out_dim: int | None = None, rank: int = 4
) -> Fusion:
    """Build the fusion called ``name``; ``out_dim`` and ``rank`` are used by ``lrtf`` only."""
    if name not in FUSIONS:
        raise MMLearnError(
            f"model.fusion: unknown fusion {name!r}; valid fusions: {sorted(FUSIONS)}"
        )
    return FUSIONS[name](in_dims, out_dim=out_dim, rank=rank)
