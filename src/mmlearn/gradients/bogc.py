"""BOGC: Bayesian-oriented gradient calibration (docs/methods.md section 5, our reconstruction).

Guo, Wang, Guo, Li, Sun, Zheng, Qiang, "Multi-Modal Learning with Bayesian-Oriented Gradient
Calibration", arXiv 2505.23071. Each objective's gradient is a random variable; its per-dimension
precision becomes evidence (subjective logic), the objectives' opinions are fused with the reduced
Dempster-Shafer rule of trusted multi-view classification (Han et al., ICLR 2021), and the fused
beliefs weight the objectives per dimension. The variance comes from the moments estimator
(:mod:`mmlearn.strategies.moments`); this rule is a pure function of the rows and that variance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmlearn.errors import MMLearnError
from mmlearn.gradients.base import Rule, ones

#: groups with more variance entries than this take their median on a fixed strided subsample
SUBSAMPLE = 2**18


def positive_median(x: Tensor) -> Tensor:
    """Median of the positive entries of ``x`` (a 0-dim tensor; NaN where none is positive).

    Entries ``<= 0`` (dead coordinates: zero variance) are left out, so adding them changes
    nothing. Above :data:`SUBSAMPLE` entries the median is taken on every s-th entry (s fixed
    by the size): deterministic, so every rank computes the same value from the same synced
    variance. No host synchronisation (NaN masking instead of boolean indexing).
    """
    flat = x.detach().flatten()
    if flat.numel() > SUBSAMPLE:
        flat = flat[:: -(-flat.numel() // SUBSAMPLE)]
    return torch.where(flat > 0, flat, torch.full_like(flat, float("nan"))).nanmedian()


def evidence(var: Tensor, eps_rel: float = 1e-3, e_max: float = 1e3) -> Tensor:
    """Scale-free evidence ``e = lambda / lambda_med``, clipped to ``[0, e_max]``.

    ``var [n, P]``; ``m`` the median of its positive entries (objectives and dimensions of the
    group, :func:`positive_median`); precision ``lambda = 1 / (var + eps_rel * m)``, normalised
    by the precision at the median variance ``lambda_med = 1 / (m (1 + eps_rel))`` (the median
    precision: ``lambda`` decreases with ``var``). Multiplying every gradient by ``c`` multiplies
    ``var`` and ``m`` by ``c^2`` and leaves ``e`` unchanged; coordinates with zero variance do
    not move ``m``. Where no entry has positive variance (an estimator's first step) every
    evidence is 1: equal opinions, the plain sum.
    """
    m = positive_median(var)
    if bool(m.isnan()):
        return torch.ones_like(var)
    # e = m (1 + eps_rel) / (var + eps_rel m), in place on one temporary (groups are large);
    # a negative variance counts as zero
    e = var.clamp_min(0).add_(eps_rel * m)
    return e.reciprocal_().mul_(m * (1 + eps_rel)).clamp_(0, e_max)


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


def calibrate(
    mu: Tensor, var: Tensor, eps_rel: float = 1e-3, e_max: float = 1e3
) -> tuple[Tensor, Tensor]:
    """Calibrated update ``g = n * sum_k w_k mu_k`` with ``w_k = b_k + u / n``.

    Args:
        mu: ``[n, P]`` each objective's gradient this step.
        var: ``[n, P]`` each objective's per-dimension gradient variance.
        eps_rel: variance floor relative to the group's median variance.
        e_max: evidence cap (the evidence of the median-variance entry is 1).

    Returns:
        ``(g [P], w [n, P])``; ``w`` is positive and sums to 1 over objectives. Equal variances
        give ``w = 1/n`` and ``g = sum_k mu_k``; a lower-variance objective gets more weight.
    """
    n = mu.shape[0]
    e = evidence(var, eps_rel, e_max)  # a new tensor: updated in place below
    # w = b + u/n = (e + 1/n) / (S + 1), and sum_k (e_k + 1/n) = S + 1: formed in place, the
    # group can hold millions of entries
    w = e.add_(1.0 / n)
    w /= w.sum(0, keepdim=True)
    return weighted_sum(mu, w).mul_(n), w


def weighted_sum(mu: Tensor, w: Tensor) -> Tensor:
    """``sum_k w_k mu_k`` ``[P]`` for per-dimension weights ``w [n, P]``, one pass per row.

    (``(w * mu).sum(0)`` first writes the whole ``[n, P]`` product.)
    """
    g = torch.mul(w[0].to(mu.dtype), mu[0])
    for k in range(1, mu.shape[0]):
        g.addcmul_(w[k].to(mu.dtype), mu[k])
    return g


class BOGCCalibration(Rule):
    """BOGC's combining rule: per-dimension weights from the objectives' gradient variances.

    Needs a moments estimator that gives a variance (``EMAMoments``, ``Microbatch``,
    ``LastLayer``). A group reached by one objective gets its gradient unchanged.

    Args:
        eps_rel: variance floor, relative to the group's median positive variance (so that the
            method does not depend on the gradients' scale).
        e_max: evidence cap, in units of the median-variance entry's evidence.
    """

    needs_variance = True

    def __init__(self, eps_rel: float = 1e-3, e_max: float = 1e3) -> None:
        if not eps_rel > 0:
            raise MMLearnError(f"BOGC: eps_rel={eps_rel}; expected > 0")
        if not e_max > 0:
            raise MMLearnError(f"BOGC: e_max={e_max}; expected > 0")
        self.eps_rel, self.e_max = eps_rel, e_max

    def __call__(self, rows: Tensor, var: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if rows.shape[0] == 1:
            return rows[0], ones(rows)
        if var is None:
            raise MMLearnError(
                "BOGCCalibration needs a per-dimension variance: choose a moments estimator that "
                "gives one (EMAMoments, Microbatch or LastLayer), not BatchRows"
            )
        return calibrate(rows, var, self.eps_rel, self.e_max)

    def apply(self, rows: Tensor, weights: Tensor) -> Tensor:
        if rows.shape[0] == 1:
            return rows[0]
        return weighted_sum(rows, weights).mul_(rows.shape[0])
