"""BOGC: Bayesian-oriented gradient calibration of the fused and unimodal objectives."""

from __future__ import annotations

from typing import Any

from mmlearn.errors import MMLearnError
from mmlearn.gradients import BOGCCalibration
from mmlearn.strategies.moments import EMAMoments, Moments
from mmlearn.strategies.multi_objective import MultiObjective


class BOGC(MultiObjective):
    """Per-dimension calibration of each encoder's fused and unimodal gradients.

    Guo et al., "Multi-Modal Learning with Bayesian-Oriented Gradient Calibration", arXiv
    2505.23071 (docs/methods.md section 5, our reconstruction): the variance of every objective's
    gradient gives per-dimension precision -> scale-free evidence -> reduced Dempster-Shafer
    fusion -> weights ``w_k = b_k + u/n``; the update is ``n * sum_k w_k mu_k`` (equal variances:
    the plain sum). A preset of :class:`MultiObjective` with the rule
    :class:`~mmlearn.gradients.BOGCCalibration`.

    Args:
        moments: where the variance comes from: ``EMAMoments`` (default, ``beta=0.9``; moving
            moments over steps, no extra backward), ``Microbatch`` (``n_chunks`` chunk gradients
            of the batch; ``n_chunks`` backward passes) or ``LastLayer`` (the per-sample
            variance of each objective's last linear layer in closed form), all from
            :mod:`mmlearn.strategies.moments`.
        eps_rel: variance floor relative to each group's median positive variance.
        e_max: evidence cap (the median-variance entry has evidence 1).
        **kwargs: see :class:`MultiObjective` (``every``) and
            :class:`~mmlearn.strategies.base.MultimodalModule` (``clip_grad_norm``).

    Cost: per step, the forward, the heads' backward per objective and one backward through
    each encoder per objective reaching it (``EMAMoments``, ``LastLayer``), times ``n_chunks``
    for ``Microbatch``.
    """

    def __init__(
        self,
        moments: Moments | None = None,
        eps_rel: float = 1e-3,
        e_max: float = 1e3,
        **kwargs: Any,
    ) -> None:
        if "rule" in kwargs:
            raise MMLearnError("BOGC: its rule is BOGCCalibration; use MultiObjective for another")
        super().__init__(
            rule=BOGCCalibration(eps_rel=eps_rel, e_max=e_max),
            moments=moments if moments is not None else EMAMoments(),
            **kwargs,
        )
