"""Late fusion with unimodal heads: the reference strategy, and the model MIMO, BOGC and the
gradient baselines share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mmlearn.strategies.base import FUSED, MultimodalModule
from mmlearn.strategies.step import ParamGroup, validate_groups


class LateFusionHeads(MultimodalModule):
    """InterOnly with a linear head on each encoder, trained on ``L_0 + sum_m L_m``.

    Objectives: ``L_0 = CE(z_J, y)`` (key ``"fused"``) and ``L_m = CE(h_m(phi_m(x_m)), y)`` (key
    ``m``). The encoders are shared: encoder m is reached by ``fused`` and ``m``, the fusion and
    fused head by ``fused`` only, head m by ``m`` only (:meth:`parameter_groups`). Inference is the
    fused head; the unimodal heads give per-modality predictions for free.

    As a strategy of its own (``--model LateFusionHeads``) it is trained by automatic
    optimisation of the plain sum: the reference every gradient-level strategy's step time is
    measured against (docs/methods.md section 9), and what ``MultiObjective`` with ``Sum``
    computes through the manual step.

    Args: see :class:`~mmlearn.strategies.base.MultimodalModule`.
    """

    has_experts = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.joint = self.build_joint()
        self.heads = nn.ModuleDict(
            {m: nn.Linear(self.embed_dim, self.num_classes) for m in self.modalities}
        )
        self.objective_names = [FUSED, *self.modalities]

    def forward_features(
        self, inputs: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(features {m: [B, D]}, logits {"fused": [B, K], m: [B, K]})``."""
        feats = self.joint.features(inputs)
        out = {FUSED: self.joint.head(self.joint.fusion(feats))}
        return feats, out | {m: head(feats[m]) for m, head in self.heads.items()}

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.forward_features(inputs)[1]

    def feature_encoders(self) -> dict[str, tuple[str, nn.Module]]:
        return {f"joint.{m}": (m, e) for m, e in self.joint.encoders.items()}

    def decode(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feats = {m: features[f"joint.{m}"] for m in self.modalities}
        out = {FUSED: self.joint.decode(feats)}
        return out | {m: head(feats[m]) for m, head in self.heads.items()}

    def objective_graph(
        self, inputs: Mapping[str, Tensor], target: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """``(outputs, losses, features)``: what the manual step differentiates."""
        feats, outputs = self.forward_features(inputs)
        return outputs, self.objectives(outputs, target), feats

    def objectives(self, outputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        return {k: self.loss(z, target) for k, z in outputs.items()}

    def predict_log_proba(
        self, outputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        return self.log_proba(outputs[FUSED])

    def last_linear(self, objective: str) -> nn.Linear:
        """The final linear layer of ``objective``'s head."""
        head = self.joint.head if objective == FUSED else self.heads[objective]
        return [m for m in head.modules() if isinstance(m, nn.Linear)][-1]

    def parameter_groups(self) -> list[ParamGroup]:
        """Which objectives reach which parameters (validated: each parameter in one group).

        Encoder m's group is reached through its features (``boundary=m``).
        """
        groups = [
            ParamGroup(
                f"encoder.{m}", list(self.joint.encoders[m].parameters()), [FUSED, m], boundary=m
            )
            for m in self.modalities
        ]
        fused = [*self.joint.fusion.parameters(), *self.joint.head.parameters()]
        groups.append(ParamGroup("fused_head", fused, [FUSED]))
        groups += [
            ParamGroup(f"head.{m}", list(h.parameters()), [m]) for m, h in self.heads.items()
        ]
        validate_groups(groups, self, self.objective_names)
        return groups

    def log_encoder_cosines(self, rows: Mapping[str, Tensor], batch_size: int) -> None:
        """``train/cos/{m}``: cosine between the fused and the unimodal gradient on encoder m."""
        # three reductions over the rows, no normalised copies (F.cosine_similarity divides
        # both vectors first: two allocations of the encoder's size per step)
        cos = {
            f"train/cos/{m}": (r[0] @ r[1]) / (r[0].norm() * r[1].norm()).clamp_min(1e-12)
            for m in self.modalities
            if (r := rows.get(f"encoder.{m}")) is not None
        }
        self.log_dict(cos, on_step=True, on_epoch=True, batch_size=batch_size)
