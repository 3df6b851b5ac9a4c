"""I2M2: inter- and intra-modality product of experts (docs/methods.md section 3)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from mmlearn.errors import MMLearnError
from mmlearn.heads import all_present
from mmlearn.strategies.base import FUSED, MultimodalModule, UnimodalExpert

MISSING_JOINT = ("impute", "drop")


class I2M2(MultimodalModule):
    """Product of the joint expert and the unimodal experts.

    Madaan, Makino, Chopra, Cho, "Jointly Modeling Inter- & Intra-Modality Dependencies for
    Multi-modal Learning", NeurIPS 2024 (arXiv 2405.17613). With the label generating every
    modality and a selection variable depending on all of them, the posterior factorises as
    ``s = lsm(z_J) + sum_m lsm(z_m)``, ``log p(y|x) = s - logsumexp(s) = lsm(z_J + sum_m z_m)``.
    Training is ONE cross-entropy on that distribution (no auxiliary losses). The joint expert
    (encoders + fusion + head) and each unimodal expert have their own encoders.

    Args:
        init_from: optional checkpoints to start from, as the paper does on AV-MNIST:
            ``{"joint": <InterOnly or I2M2 ckpt>, "<modality>": <IntraOnly or I2M2 ckpt>}``.
            The joint expert loads the checkpoint's ``joint.*`` weights, a modality's expert its
            ``experts.<modality>.*`` weights; then everything is fine-tuned together.
        missing_joint: at inference with a modality missing, ``"impute"`` feeds the joint expert
            zeros for it (the training mean of a standardised modality), ``"drop"`` removes the
            joint term for that sample.
            The missing modality's unimodal term is always dropped.
        **kwargs: see :class:`~mmlearn.strategies.base.MultimodalModule`.

    Cost: forward of the joint model plus M unimodal models, one backward. Clip the global
    gradient norm over all experts together (the paper: 8) with ``clip_grad_norm``.
    """

    has_experts = True
    drops_experts = True

    def __init__(
        self,
        init_from: Mapping[str, str] | None = None,
        missing_joint: str = "impute",
        **kwargs: Any,
    ) -> None:
        if missing_joint not in MISSING_JOINT:
            raise MMLearnError(
                f"I2M2: missing_joint={missing_joint!r}; expected {list(MISSING_JOINT)}"
            )
        super().__init__(**kwargs)
        self.missing_joint = missing_joint
        self.joint = self.build_joint()
        self.experts = nn.ModuleDict({m: self.build_expert(m) for m in self.modalities})
        for key, path in (init_from or {}).items():
            self.load_expert(key, path)

    def load_expert(self, key: str, path: str | Path) -> None:
        """Load ``"joint"`` or one modality's expert from a checkpoint of another run."""
        if key == "joint":
            prefix, module = "joint.", cast(nn.Module, self.joint)
        elif key in self.experts:
            prefix, module = f"experts.{key}.", self.experts[key]
        else:
            raise MMLearnError(
                f"I2M2.init_from: unknown key {key!r}; expected 'joint' or one of {self.modalities}"
            )
        if not Path(path).is_file():
            raise FileNotFoundError(f"I2M2.init_from.{key}: checkpoint {str(path)!r} not found")
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise MMLearnError(
                f"I2M2.init_from.{key}: checkpoint {str(path)!r} has no weights under {prefix!r} "
                "(the joint expert comes from an InterOnly/I2M2 run, a modality's expert from an "
                "IntraOnly/I2M2 run of the same architecture)"
            )
        module.load_state_dict(sub, strict=True)

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {FUSED: self.joint(inputs)}
        out |= {m: expert(inputs[m]) for m, expert in self.experts.items()}
        return out

    def feature_encoders(self) -> dict[str, tuple[str, nn.Module]]:
        joint = {f"joint.{m}": (m, e) for m, e in self.joint.encoders.items()}
        experts = {m: cast(UnimodalExpert, e) for m, e in self.experts.items()}
        return joint | {f"experts.{m}": (m, e.encoder) for m, e in experts.items()}

    def decode(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {FUSED: self.joint.decode({m: features[f"joint.{m}"] for m in self.modalities})}
        experts = {m: cast(UnimodalExpert, e) for m, e in self.experts.items()}
        return out | {m: e.head(features[f"experts.{m}"]) for m, e in experts.items()}

    def objectives(self, outputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        return {"product": self.nll(self.likelihood.product_of_experts(outputs), target)}

    def predict_log_proba(
        self, outputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        masks: dict[str, Tensor | None] = dict(present or {})
        masks[FUSED] = all_present(present) if self.missing_joint == "drop" else None
        return self.likelihood.product_of_experts(outputs, masks)
