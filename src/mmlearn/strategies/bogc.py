"""BOGC: Bayesian-oriented gradient calibration of the fused and unimodal objectives."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmlearn.batch import MultimodalBatch
from mmlearn.errors import MMLearnError
from mmlearn.gradients import BOGCCalibration
from mmlearn.strategies import _jacobian as jac
from mmlearn.strategies.multi_objective import MultiObjective

VARIANCES = ("ema", "microbatch")


class BOGC(MultiObjective):
    """Per-dimension calibration of each encoder's fused and unimodal gradients.

    Guo et al., "Multi-Modal Learning with Bayesian-Oriented Gradient Calibration", arXiv
    2505.23071 (METHODS.md section 5, our reconstruction): the variance of every objective's
    gradient gives per-dimension precision -> evidence -> reduced Dempster-Shafer fusion ->
    weights ``w_k = b_k + u/n``; the update is ``n * sum_k w_k mu_k`` (equal variances: the plain
    sum). See :mod:`mmlearn.gradients.bogc` for the rule.

    Args:
        variance: ``"ema"`` (default; moving moments of each objective's gradient over steps, no
            extra backward) or ``"microbatch"`` (the batch split into ``n_chunks``, one gradient per
            chunk, their mean and variance: ``n_chunks`` forward/backward passes).
        beta: EMA decay (``ema``).
        n_chunks: chunks per step over ALL ranks (``microbatch``); must divide by the world size,
            and each rank's batch by ``n_chunks / world_size``.
        eps: added to the variance before inverting.
        e_max: evidence cap.
        **kwargs: see :class:`MultiObjective` (``clip_grad_norm``) and
            :class:`~mmlearn.strategies.base.MultimodalModule`.

    Cost: per step, the fused backward plus one backward through each encoder for its unimodal
    row (``ema``), times ``n_chunks`` for ``microbatch``. ``"last_layer"`` (closed-form variance
    for linear heads) is not implemented.
    """

    def __init__(
        self,
        variance: str = "ema",
        beta: float = 0.9,
        n_chunks: int = 4,
        eps: float = 1e-8,
        e_max: float = 1e3,
        **kwargs: Any,
    ) -> None:
        if variance not in VARIANCES:
            raise MMLearnError(f"BOGC: variance={variance!r}; expected one of {list(VARIANCES)}")
        if variance == "microbatch" and n_chunks < 2:
            raise MMLearnError(f"BOGC: n_chunks={n_chunks}; the microbatch variance needs >= 2")
        kwargs["rule"] = BOGCCalibration(beta=beta, eps=eps, e_max=e_max)
        super().__init__(**kwargs)
        self.variance, self.n_chunks = variance, n_chunks

    def gradient_statistics(self, batch: MultimodalBatch):
        if self.variance == "ema":
            return super().gradient_statistics(batch)
        world = jac.world_size()
        local = self.n_chunks // world
        if local * world != self.n_chunks or batch.size % local:
            raise MMLearnError(
                f"BOGC: n_chunks={self.n_chunks} does not split {world} rank(s) x batch "
                f"{batch.size} into equal chunks"
            )
        size = batch.size // local
        total: dict[str, Tensor] = {}
        squares: dict[str, Tensor] = {}
        outs: list[dict[str, Tensor]] = []
        loss_sum: dict[str, Tensor] = {}
        for c in range(local):
            part = slice(c * size, (c + 1) * size)
            outputs = self({m: x[part] for m, x in batch.inputs.items()})
            losses = self.objectives(outputs, batch.target[part])
            rows = jac.objective_rows(losses, self.groups)
            for g, r in rows.items():
                total[g] = total.get(g, 0) + r
                squares[g] = squares.get(g, 0) + r * r
            outs.append({k: v.detach() for k, v in outputs.items()})
            for k, v in losses.items():
                loss_sum[k] = loss_sum.get(k, 0) + v.detach() / local
        # ONE collective for both moments of every group
        moments = jac.reduce_rows(
            {
                **{f"s:{g}": t for g, t in total.items()},
                **{f"q:{g}": q for g, q in squares.items()},
            },
            mean=False,
        )
        n = self.n_chunks
        mean = {g: moments[f"s:{g}"] / n for g in total}
        var = {g: (moments[f"q:{g}"] / n - mean[g] ** 2).clamp_min(0) * n / (n - 1) for g in total}
        outputs = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return outputs, loss_sum, mean, var
