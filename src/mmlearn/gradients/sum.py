"""The plain sum of the objectives' gradients (what automatic optimisation computes)."""

from __future__ import annotations

import torch
from torch import Tensor

from mmlearn.gradients.base import Rule


class Sum(Rule):
    """``g = sum_k g_k``: the gradient of ``sum_k L_k``, the reference every rule is compared to."""

    def combine(
        self, rows: Tensor, group: str = "", var: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return rows.sum(0), torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)
