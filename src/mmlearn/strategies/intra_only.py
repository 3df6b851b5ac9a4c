"""Intra-only: unimodal experts combined as a product of experts (docs/methods.md section 2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from mmlearn.errors import MMLearnError
from mmlearn.strategies.base import MultimodalModule, UnimodalExpert

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
        divide_prior: ``mode="independent"`` only: combine the experts as
            ``p(y|x) ∝ prod_m p_m(y|x_m) / p(y)^(M-1)``, the posterior under conditional
            independence of the modalities given the label. Each separately trained expert's
            ``p_m(y|x_m)`` contains the class prior ``p(y)`` once, so the plain product would
            count it M times (multi-label: per label, ``logit = sum_m z_m - (M-1) logit(p_k)``).
            ``p(y)`` is the training class frequencies, read from the DataModule's
            ``class_frequencies()`` at ``setup`` (or given as ``class_frequencies``). Without
            either the prior stays uniform, which is no correction. ``mode="joint"`` trains the
            product itself, so the prior is learned once and nothing is divided out.
        class_frequencies: ``[K]`` training class frequencies (multi-label: per-label positive
            rates) for a model used without a DataModule; when given, ``setup`` keeps them.
        **kwargs: see :class:`~mmlearn.strategies.base.MultimodalModule`.

    A missing modality drops its term from the product, which stays a normalised distribution
    (with ``divide_prior``, one factor of the prior is dropped with it: with the experts S present,
    ``prod_{m in S} p_m / p^(|S|-1)``). Cost: forward of M unimodal models, one backward.

    Buffers: ``prior_logits`` ``[K]``, the prior as logits (``log p(y)``; multi-label the log odds
    ``logit p_k``), zeros until the frequencies are known; saved in checkpoints.
    """

    has_experts = True
    drops_experts = True

    def __init__(
        self,
        mode: str = "joint",
        divide_prior: bool = True,
        class_frequencies: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise MMLearnError(f"IntraOnly: mode={mode!r}; expected one of {list(MODES)}")
        super().__init__(**kwargs)
        self.mode = mode
        self.divide_prior = bool(divide_prior)
        self.experts = nn.ModuleDict({m: self.build_expert(m) for m in self.modalities})
        # zeros: the uniform prior (shifting all K logits alike changes nothing), no correction
        self.register_buffer("prior_logits", torch.zeros(self.num_classes, dtype=torch.float32))
        self._given_prior = class_frequencies is not None
        if class_frequencies is not None:
            self.set_class_frequencies(class_frequencies)

    @property
    def corrects_prior(self) -> bool:
        """Whether the inference rule divides out the extra factors of the prior."""
        return self.mode == "independent" and self.divide_prior

    def set_class_frequencies(self, frequencies: Sequence[float] | Tensor) -> None:
        """Set ``p(y)`` from the training class frequencies ``[K]`` (multi-label: positive rates).

        Raises:
            MMLearnError: not K finite values >= 0 (multi-label: in ``[0, 1]``).
        """
        f = torch.as_tensor(frequencies, dtype=torch.float32)
        if f.shape != (self.num_classes,):
            raise MMLearnError(
                f"IntraOnly: class frequencies of shape {list(f.shape)}; expected "
                f"[{self.num_classes}] (one per class)"
            )
        self._prior.copy_(self.likelihood.prior_logits(f).to(self._prior))

    @property
    def _prior(self) -> Tensor:
        return cast(Tensor, self.prior_logits)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self.corrects_prior or self._given_prior or self._trainer is None:
            return
        frequencies = getattr(getattr(self.trainer, "datamodule", None), "class_frequencies", None)
        if frequencies is None:
            return  # no DataModule, or one without a training split: the prior stays as it is
        # when fitting, the prior of the data being trained on; when only evaluating, a model
        # restored from a checkpoint keeps the prior of the data it was trained on
        if stage == "fit" or not bool(self._prior.any()):
            self.set_class_frequencies(frequencies())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # a checkpoint written before `prior_logits` existed loads with the model's current one
        state = checkpoint.get("state_dict")
        if state is not None:
            state.setdefault("prior_logits", self._prior.detach().clone())

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: expert(inputs[m]) for m, expert in self.experts.items()}

    def feature_encoders(self) -> dict[str, tuple[str, nn.Module]]:
        return {f"experts.{m}": (m, self._expert(m).encoder) for m in self.modalities}

    def decode(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self._expert(m).head(features[f"experts.{m}"]) for m in self.modalities}

    def _expert(self, modality: str) -> UnimodalExpert:
        return cast(UnimodalExpert, self.experts[modality])

    def objectives(self, outputs: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        if self.mode == "independent":
            return {m: self.loss(outputs[m], target) for m in self.modalities}
        return {"product": self.nll(self.likelihood.product_of_experts(outputs), target)}

    def predict_log_proba(
        self, outputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        prior = self._prior if self.corrects_prior else None
        return self.likelihood.product_of_experts(
            {m: outputs[m] for m in self.modalities}, present, prior
        )
