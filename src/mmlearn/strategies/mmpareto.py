"""MMPareto: the fused and unimodal gradients of each encoder combined without conflict."""

from __future__ import annotations

from typing import Any

from mmlearn.errors import MMLearnError
from mmlearn.gradients import MMParetoCombination
from mmlearn.strategies.multi_objective import MultiObjective


class MMPareto(MultiObjective):
    """Late fusion with unimodal heads; each encoder's two gradients combined as in MMPareto.

    Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
    ICML 2024 (docs/methods.md section 6). Objectives: ``L_0 = CE(z_J, y)`` and
    ``L_m = CE(h_m(phi_m(x_m)), y)``. On encoder m: equal weights when ``cos(g_0, g_m) > 0``,
    else the min-norm weights of the two, clipped to ``[clip, 1 - clip]``;
    ``new = 2 (w_0 g_0 + w_m g_m)``, rescaled per parameter tensor to at least the plain sum's
    norm, times ``gamma`` (:class:`~mmlearn.gradients.MMParetoCombination`). The fusion and
    heads get their own objective's gradient, as under the plain sum. Inference: the fused head.
    The fused head is the shared one (``head_hidden`` 128 by default); the authors' is linear on
    the concat features (``head_hidden: null``).

    A preset of :class:`MultiObjective` with that rule: the rows are synced over ranks before
    the rule runs, so 2 ranks train as 1 process on the doubled batch. Any number of
    modalities: every encoder has exactly its two objectives, so the rule is the paper's.

    Args:
        gamma: the step multiplier (paper: 1.5).
        clip: bound of the min-norm weights (paper: 0.001).
        **kwargs: see :class:`MultiObjective` (``moments``, ``every``) and
            :class:`~mmlearn.strategies.base.MultimodalModule` (``clip_grad_norm``).

    Cost: the forward, the heads' backward per objective and one backward through each encoder
    per objective reaching it (M + 1 objectives; the paper's loop runs M + 2 full backwards).
    """

    def __init__(self, gamma: float = 1.5, clip: float = 0.001, **kwargs: Any) -> None:
        if "rule" in kwargs:
            raise MMLearnError(
                "MMPareto: its rule is MMParetoCombination; use MultiObjective for another"
            )
        super().__init__(rule=MMParetoCombination(gamma=gamma, clip=clip), **kwargs)
