"""Inter-only: one joint fusion model (docs/methods.md section 1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mmlearn.strategies.base import FUSED, MultimodalModule


class InterOnly(MultimodalModule):
    """Joint (inter-modality) model trained on ``CE(z_J, y)``; inference ``argmax z_J``.

    ``z_J = h_J(F(phi_1(x_1), ..., phi_M(x_M)))``: the "inter-modality" baseline of I2M2
    (Madaan et al., NeurIPS 2024, section 3) and the usual late/intermediate fusion model. A
    missing modality is imputed with zeros (the training mean of a standardised modality).
    One forward and one backward per step (the reference cost).

    Args: see :class:`~mmlearn.strategies.base.MultimodalModule`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.joint = self.build_joint()

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {FUSED: self.joint(inputs)}

    def feature_encoders(self) -> dict[str, tuple[str, nn.Module]]:
        return {f"joint.{m}": (m, e) for m, e in self.joint.encoders.items()}

    def decode(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {FUSED: self.joint.decode({m: features[f"joint.{m}"] for m in self.modalities})}

    def objectives(self, outputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        return {FUSED: self.loss(outputs[FUSED], target)}

    def predict_log_proba(
        self, outputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        return self.log_proba(outputs[FUSED])
