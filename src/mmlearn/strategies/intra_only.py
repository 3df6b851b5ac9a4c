"""Intra-only: unimodal experts combined as a product of experts (docs/methods.md section 2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mmlearn.errors import MMLearnError
from mmlearn.heads import product_of_experts
from mmlearn.strategies.base import MultimodalModule

MODES = ("joint", "independent")


class IntraOnly(MultimodalModule):
    """One expert per modality, ``z_m = h_m(phi_m(x_m))``; prediction ``lsm(sum_m lsm(z_m))``.

    The intra-modality model of I2M2 (Madaan et al., "Jointly Modeling Inter- & Intra-Modality
    Dependencies for Multi-modal Learning", NeurIPS 2024): it captures every dependency between
    a modality and the label but none across modalities.

    Args:
        mode: ``"joint"`` (the paper's model, default): one cross-entropy on the normalised product
            ``lsm(sum_m lsm(z_m)) == lsm(sum_m z_m)``, no per-expert losses. ``"independent"``:
            each expert trained on its own ``CE(z_m, y)`` (M independent trainings in one run),
            combined by the same product at inference.
        **kwargs: see :class:`~mmlearn.strategies.base.MultimodalModule`.

    A missing modality drops its term from the product, which stays a normalised distribution.
    Cost: forward of M unimodal models, one backward.
    """

    has_experts = True

    def __init__(self, mode: str = "joint", **kwargs: Any) -> None:
        if mode not in MODES:
            raise MMLearnError(f"IntraOnly: mode={mode!r}; expected one of {list(MODES)}")
        super().__init__(**kwargs)
        self.mode = mode
        self.experts = nn.ModuleDict({m: self.build_expert(m) for m in self.modalities})

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: expert(inputs[m]) for m, expert in self.experts.items()}

    def objectives(self, outputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        if self.mode == "independent":
            return {m: self.loss(outputs[m], target) for m in self.modalities}
        return {
            "product": self.nll(product_of_experts(outputs, multilabel=self.multilabel), target)
        }

    def predict_log_proba(
        self, outputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        return product_of_experts(
            {m: outputs[m] for m in self.modalities}, present, multilabel=self.multilabel
        )
