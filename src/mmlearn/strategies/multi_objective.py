"""Gradient-level combination of the fused and unimodal objectives: rows x moments x rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mmlearn.batch import MultimodalBatch
from mmlearn.errors import MMLearnError
from mmlearn.gradients import Rule, Sum
from mmlearn.strategies.late_fusion import LateFusionHeads
from mmlearn.strategies.moments import BatchRows, Moments
from mmlearn.strategies.step import ManualStep


def refuse_float16(precision: str, strategy: str) -> None:
    """Gradient rows need no loss scaling only in float32/bfloat16; refuse float16 clearly.

    (On CPU Lightning itself turns '16-mixed' into 'bf16-mixed', so this fires on GPUs.)
    """
    if precision.startswith("16"):
        raise MMLearnError(
            f"{strategy}: trainer.precision={precision!r} is not supported: float16 would need a "
            "loss scaler per objective row; use '32-true' or 'bf16-mixed'"
        )


class MultiObjective(LateFusionHeads):
    """Late fusion with unimodal heads, its objectives' gradients combined by ``rule``.

    The one manual-optimisation strategy (docs/methods.md section 9): each step, the ``moments``
    estimator computes every objective's gradient rows per parameter group (and, where it can,
    their variance) as rank-local sums, the step all-reduces them in ONE collective, and
    ``rule`` combines them group by group, identically on every rank
    (:class:`~mmlearn.strategies.step.ManualStep`). With ``MGDA`` this is the multi-objective
    baseline (Sener and Koltun, NeurIPS 2018); ``BOGC`` is a preset of it.

    Args:
        rule: the combining rule, e.g. ``{class_path: mmlearn.gradients.MGDA}``; default
            ``Sum`` (the plain sum, equal to :class:`LateFusionHeads`).
        moments: the moments estimator, e.g. ``{class_path: mmlearn.strategies.EMAMoments}``;
            default ``BatchRows`` (this step's rows, no variance).
        every: recompute the rule's weights every ``every`` steps and re-apply the last ones in
            between (the rows and moments are still computed every step).
        **kwargs: see :class:`~mmlearn.strategies.base.MultimodalModule` (``clip_grad_norm``).
    """

    def __init__(
        self,
        rule: Rule | None = None,
        moments: Moments | None = None,
        every: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.rule = rule if rule is not None else Sum()
        self.moments = moments if moments is not None else BatchRows()
        if self.rule.needs_variance and not self.moments.gives_variance:
            raise MMLearnError(
                f"{type(self).__name__}: rule {type(self.rule).__name__} needs a variance, "
                f"moments {type(self.moments).__name__} gives none; use EMAMoments, Microbatch "
                "or LastLayer"
            )
        if int(every) < 1:
            raise MMLearnError(f"{type(self).__name__}: every={every}; expected >= 1")
        self.every = int(every)
        self.automatic_optimization = False
        self.groups = self.parameter_groups()
        self.moments.bind(self)
        self.gradient_step = ManualStep()
        self.cached_weights: dict[str, Tensor] | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        refuse_float16(str(self.trainer.precision), type(self).__name__)

    def training_step(self, batch: MultimodalBatch, batch_idx: int) -> None:
        self.check_batch(batch, "train")
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        report = self.gradient_step(self, batch)
        if self.clip_grad_norm:
            self.clip_gradients(opt, self.clip_grad_norm, "norm")  # type: ignore[arg-type]
        opt.step()  # type: ignore[union-attr]
        self.log_step(report["losses"], report["rows"], report["weights"], batch)
        with torch.no_grad():
            self._update_metrics("train", report["outputs"], batch)

    def log_step(
        self,
        losses: Mapping[str, Tensor],
        rows: Mapping[str, Tensor],
        weights: Mapping[str, Tensor],
        batch: MultimodalBatch,
    ) -> None:
        """Losses, the rule's mean weight per objective and group, and the encoder cosines."""
        self.log_losses(self.total_loss(losses), losses, batch.size)
        log: dict[str, Tensor] = {}
        for g in self.groups:
            if len(g.objectives) > 1:
                w = weights[g.name]
                w = w.mean(1) if w.dim() == 2 else w
                log |= {f"train/weight/{g.name}/{k}": w[i] for i, k in enumerate(g.objectives)}
        self.log_dict(log, on_step=True, on_epoch=True, batch_size=batch.size)
        self.log_encoder_cosines(rows, batch.size)

    def on_train_epoch_end(self) -> None:
        # manual optimisation: Lightning leaves scheduler stepping to us
        if (sch := self.lr_schedulers()) is not None:
            sch.step()  # type: ignore[union-attr]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the moments' state is in module buffers (the state dict); the weights reused between
        # recomputations (every > 1) are not, and a resumed run must reuse the same ones
        if self.cached_weights is not None:
            checkpoint["cached_weights"] = {k: v.cpu() for k, v in self.cached_weights.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("cached_weights")
        if saved is not None:
            self.cached_weights = {k: v.to(self.device) for k, v in saved.items()}
