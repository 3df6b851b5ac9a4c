"""MIMO: multi-objective optimisation against modality imbalance (docs/methods.md section 4)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mmlearn.errors import MMLearnError
from mmlearn.strategies import step
from mmlearn.strategies.base import FUSED
from mmlearn.strategies.late_fusion import LateFusionHeads


class MIMO(LateFusionHeads):
    """Penalised objective with closed-form modality weights: one backward per step.

    Fernando et al., "Mitigating Modality Imbalance in Multi-modal Learning via Multi-objective
    Optimization", arXiv 2511.06686 (our reconstruction of the algorithm): minimise
    ``F = L_0 + gamma_t * mu * logsumexp(L_1/mu, ..., L_M/mu)``, a smooth stand-in for the
    worst unimodal loss. Its gradient is ``grad L_0 + gamma_t * sum_m pi_m grad L_m`` with
    ``pi = softmax(L / mu)``: the weakest modality gets the largest weight, no sub-problem.

    ``pi`` is computed from the unimodal losses averaged over ranks (one all-reduce of M
    scalars, :func:`mmlearn.strategies.step.sync_mean`), so the step equals single-process
    training on the whole batch; it is logged as ``train/pi/{modality}``, the method's main
    diagnostic, and ``train/loss`` is ``F``.

    Args:
        mu: smoothing temperature, > 0 (-> 0: the max; large: the mean).
        gamma: penalty weight gamma_0, ``0 <= gamma <= gamma_max``.
        gamma_power: p in ``gamma_t = min(gamma_0 * (1 + t)^p, gamma_max)``, t the global step
            (0: constant).
        gamma_max: cap of the schedule.
        **kwargs: see :class:`~mmlearn.strategies.base.MultimodalModule`.
    """

    def __init__(
        self,
        mu: float = 0.5,
        gamma: float = 1.0,
        gamma_power: float = 0.0,
        gamma_max: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 < mu < math.inf:
            raise MMLearnError(
                f"MIMO: mu={mu}; expected a finite mu > 0 (the smoothing temperature)"
            )
        if not 0 <= gamma <= gamma_max:
            raise MMLearnError(
                f"MIMO: gamma={gamma} with gamma_max={gamma_max}; expected 0 <= gamma <= "
                "gamma_max (gamma_max caps the schedule, it would silently replace gamma)"
            )
        self.mu, self.gamma, self.gamma_power, self.gamma_max = mu, gamma, gamma_power, gamma_max

    def gamma_at(self, step: int) -> float:
        return min(self.gamma * (1 + step) ** self.gamma_power, self.gamma_max)

    def modality_weights(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``pi = softmax(L / mu)`` over the unimodal losses, ``[M]``, synced across ranks."""
        uni = torch.stack([losses[m].detach() for m in self.modalities])
        # at least float32 (bf16 losses), float64 kept: pi's error grows like eps * L / mu
        uni = uni.to(torch.promote_types(uni.dtype, torch.float32))
        return torch.softmax(step.sync_mean(uni) / self.mu, dim=0)

    def total_loss(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``F``'s value, with the gradient of ``L_0 + gamma_t * sum_m pi_m L_m``."""
        pi = self.modality_weights(losses)
        gamma = self.gamma_at(self.global_step)
        uni = torch.stack([losses[m] for m in self.modalities])
        # pi is the derivative of mu*logsumexp(L/mu): same gradient as F, with pi from the
        # rank-averaged losses; the detached difference makes the value F itself
        surrogate = losses[FUSED] + gamma * (pi.to(uni.dtype) * uni).sum()
        value = losses[FUSED] + gamma * self.mu * torch.logsumexp(uni / self.mu, 0)
        if self._trainer is not None:
            log = {f"train/pi/{m}": pi[i] for i, m in enumerate(self.modalities)}
            # per-step scalars: batch_size=1 makes their epoch value the plain mean over steps
            self.log_dict(log | {"train/gamma": gamma}, on_step=True, on_epoch=True, batch_size=1)
        return surrogate + (value - surrogate).detach()
