"""Gradient-level combination of the fused and unimodal objectives with any combining rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mmlearn.batch import MultimodalBatch
from mmlearn.errors import MMLearnError
from mmlearn.gradients import Rule
from mmlearn.strategies import _jacobian as jac
from mmlearn.strategies.late_fusion import LateFusionHeads


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

    ``rule=None``: automatic optimisation of ``L_0 + sum_m L_m`` ("InterOnly with unimodal
    heads", the reference every gradient-level strategy is timed against). With a rule
    (``Sum``, ``MGDA``, ``BOGCCalibration``, ... from :mod:`mmlearn.gradients`), each step computes
    every objective's gradient rows per parameter group, all-reduces them once across ranks, and
    applies the rule group by group (METHODS.md section 7). ``MGDA`` here is the multi-objective
    baseline (Sener and Koltun, NeurIPS 2018) solved per encoder.

    Args:
        rule: the combining rule, e.g. ``{class_path: mmlearn.gradients.MGDA}``.
        clip_grad_norm: global gradient-norm clip after combining (manual optimisation cannot use
            ``trainer.gradient_clip_val``).
        local_statistics: DIAGNOSTIC, wrong on purpose: apply the rule to each rank's own rows and
            average the results. Ranks stay equal, but the result depends on the number of ranks;
            the distributed tests keep it to prove that they can tell.
        **kwargs: see :class:`~mmlearn.strategies.base.MultimodalModule`.
    """

    def __init__(
        self,
        rule: Rule | None = None,
        clip_grad_norm: float | None = None,
        local_statistics: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.rule = rule
        self.clip_grad_norm = clip_grad_norm
        self.local_statistics = local_statistics
        self.automatic_optimization = rule is None
        self.groups = self.parameter_groups()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self.automatic_optimization:
            refuse_float16(str(self.trainer.precision), type(self).__name__)

    def gradient_statistics(
        self, batch: MultimodalBatch
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], dict[str, Tensor] | None]:
        """``(outputs, losses, rows, var)`` for this step; ``rows`` are synced across ranks.

        Subclasses with another variance estimator override this; ``var`` None lets the rule
        estimate what it needs from the rows.
        """
        outputs = self(batch.inputs)
        losses = self.objectives(outputs, batch.target)
        rows = jac.objective_rows(losses, self.groups)
        if not self.local_statistics:
            rows = jac.reduce_rows(rows)
        return outputs, losses, rows, None

    def training_step(self, batch: MultimodalBatch, batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        assert self.rule is not None
        self.check_batch(batch, "train")
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        outputs, losses, rows, var = self.gradient_statistics(batch)
        combined, weights = jac.combine(self.rule, self.groups, rows, var)
        if self.local_statistics:
            combined = jac.reduce_rows(combined)
        jac.write_grads(self.groups, combined)
        if self.clip_grad_norm:
            self.clip_gradients(opt, self.clip_grad_norm, "norm")  # type: ignore[arg-type]
        opt.step()  # type: ignore[union-attr]
        self.log_step(losses, rows, weights, batch)
        with torch.no_grad():
            self._update_metrics("train", outputs, batch)
        return None

    def log_step(
        self,
        losses: Mapping[str, Tensor],
        rows: Mapping[str, Tensor],
        weights: Mapping[str, Tensor],
        batch: MultimodalBatch,
    ) -> None:
        """Losses, the rule's mean weight per objective and group, and the encoder cosines."""
        log = {"train/loss": torch.stack([v.detach() for v in losses.values()]).sum()}
        log |= {f"train/loss/{k}": v.detach() for k, v in losses.items()}
        for g in self.groups:
            if len(g.objectives) > 1:
                w = weights[g.name]
                w = w.mean(1) if w.dim() == 2 else w
                log |= {f"train/weight/{g.name}/{k}": w[i] for i, k in enumerate(g.objectives)}
        self.log_dict(log, on_step=True, on_epoch=True, batch_size=batch.size)
        self.log_encoder_cosines(rows, batch.size)

    def on_train_epoch_end(self) -> None:
        # manual optimisation: Lightning leaves scheduler stepping to us
        if not self.automatic_optimization and (sch := self.lr_schedulers()) is not None:
            sch.step()  # type: ignore[union-attr]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.rule is not None and hasattr(self.rule, "state_dict"):
            checkpoint["rule_state"] = self.rule.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.rule is not None and "rule_state" in checkpoint:
            self.rule.load_state_dict(checkpoint["rule_state"], self.device)  # type: ignore[attr-defined]
