"""BOGC: Bayesian-oriented gradient calibration (METHODS.md section 5, our reconstruction).

Guo, Wang, Guo, Li, Sun, Zheng, Qiang, "Multi-Modal Learning with Bayesian-Oriented Gradient
Calibration", arXiv 2505.23071. Each objective's gradient is a random variable; its per-dimension
precision becomes evidence (subjective logic), the objectives' opinions are fused with the reduced
Dempster-Shafer rule of trusted multi-view classification (Han et al., ICLR 2021), and the fused
beliefs weight the objectives per dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmlearn.errors import MMLearnError
from mmlearn.gradients.base import Rule


def evidence(var: Tensor, eps: float = 1e-8, e_max: float = 1e3) -> Tensor:
    """Scale-free evidence ``e = lambda / mean(lambda)``, ``lambda = 1 / (var + eps)``.

    ``var [n, P]``; the mean runs over the whole group (objectives and dimensions), so the
    evidence does not depend on the gradients' scale. Clipped to ``[0, e_max]``.
    """
    lam = 1.0 / (var.clamp_min(0) + eps)
    return (lam / lam.mean()).clamp(0, e_max)


def fused_opinion(e: Tensor) -> tuple[Tensor, Tensor]:
    """Closed form of the reduced DS fusion of simple-support opinions ``b_k = e_k/(e_k+1)``.

    Returns beliefs ``b [n, P] = e / (S + 1)`` and uncertainty ``u [P] = 1 / (S + 1)``,
    ``S = sum_k e_k``.
    """
    s1 = e.sum(0) + 1
    return e / s1, 1.0 / s1


def ds_combine(b1: Tensor, u1: Tensor, b2: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    """The reduced Dempster-Shafer rule for two opinions (Han et al., ICLR 2021, eq. 4).

    ``b1, b2 [n, P]`` beliefs over n singletons, ``u1, u2 [P]``; conflict
    ``C = sum_{i != j} b1_i b2_j``, ``b = (b1 b2 + b1 u2 + b2 u1) / (1 - C)``,
    ``u = u1 u2 / (1 - C)``.
    """
    conflict = b1.sum(0) * b2.sum(0) - (b1 * b2).sum(0)
    scale = 1.0 / (1 - conflict)
    return (b1 * b2 + b1 * u2 + b2 * u1) * scale, u1 * u2 * scale


def calibrate(mu: Tensor, var: Tensor, eps: float = 1e-8, e_max: float = 1e3):
    """Calibrated update ``g = n * sum_k w_k mu_k`` with ``w_k = b_k + u / n``.

    Args:
        mu: ``[n, P]`` each objective's gradient this step.
        var: ``[n, P]`` each objective's per-dimension gradient variance.

    Returns:
        ``(g [P], w [n, P])``; ``w`` is positive and sums to 1 over objectives. Equal variances
        give ``w = 1/n`` and ``g = sum_k mu_k``; a lower-variance objective gets more weight.
    """
    n = mu.shape[0]
    b, u = fused_opinion(evidence(var, eps, e_max))
    w = b + u / n
    return n * (w * mu).sum(0), w


class BOGCCalibration(Rule):
    """BOGC's combining rule with the ``ema`` variance estimator built in.

    With ``var`` given (the ``microbatch`` estimator of the Jacobian step) it calibrates with that
    variance. Without, it keeps per-group exponential moving averages of ``g`` and ``g^2``
    (decay ``beta``, bias-corrected) over steps: ``var = E[g^2] - E[g]^2``, ``mu`` = this step's
    rows. The first step has zero variance everywhere, i.e. equal evidence and the plain sum.

    Args:
        beta: EMA decay.
        eps: added to the variance before inverting.
        e_max: evidence cap.
    """

    def __init__(self, beta: float = 0.9, eps: float = 1e-8, e_max: float = 1e3) -> None:
        if not 0 <= beta < 1:
            raise MMLearnError(f"BOGC: beta={beta}; expected 0 <= beta < 1")
        self.beta, self.eps, self.e_max = beta, eps, e_max
        self.state: dict[str, tuple[Tensor, Tensor, float]] = {}

    def ema_variance(self, rows: Tensor, group: str) -> Tensor:
        """Update the group's moving moments with ``rows`` and return the variance ``[n, P]``.

        Computes the bias-corrected ``E[g^2] - E[g]^2`` of the exponentially weighted history by
        the weighted Welford recursion (West, 1979): ``S_t = beta S + 1``,
        ``m_t = m + (g - m) / S_t``, ``M2_t = beta M2 + (g - m)(g - m_t)``, ``var = M2_t / S_t``.
        Forming ``E[g^2] - E[g]^2`` directly cancels catastrophically where the gradient is
        consistent (variance << g^2), and the evidence, a ratio of precisions, amplifies that
        rounding into the update: two summation orders of the same batch then train differently.
        """
        zeros = torch.zeros_like(rows)
        mean, m2, s = self.state.get(group, (zeros, zeros, 0.0))
        s = self.beta * s + 1.0
        delta = rows - mean
        mean = mean + delta / s
        m2 = self.beta * m2 + delta * (rows - mean)
        self.state[group] = (mean, m2, s)
        return (m2 / s).clamp_min(0)

    def combine(
        self, rows: Tensor, group: str = "", var: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if rows.shape[0] == 1:
            return rows[0], torch.ones_like(rows)
        if var is None:
            var = self.ema_variance(rows, group)
        return calibrate(rows, var, self.eps, self.e_max)

    def state_dict(self) -> dict[str, object]:
        return {"state": {k: (a.cpu(), b.cpu(), t) for k, (a, b, t) in self.state.items()}}

    def load_state_dict(self, state: dict[str, object], device: torch.device | None = None):
        saved = state.get("state", {})
        assert isinstance(saved, dict)
        self.state = {k: (a.to(device), b.to(device), t) for k, (a, b, t) in saved.items()}
