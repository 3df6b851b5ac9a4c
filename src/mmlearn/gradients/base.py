"""The interface of a combining rule: per-objective gradient rows in, one row out.

Rules import no Lightning and know nothing of models: the Jacobian step
(:mod:`mmlearn.strategies._jacobian`) hands them, per parameter group, the matrix of the
gradients of the objectives that reach that group, already averaged over ranks.
"""

from __future__ import annotations

from torch import Tensor


class Rule:
    """Combine ``rows [n, P]`` (one gradient per objective) into one update direction ``[P]``.

    ``weights`` returned beside it are ``[n]`` (one per objective) or ``[n, P]`` (per dimension)
    and are what the strategies log. ``var`` is the per-dimension variance of each row (``[n, P]``)
    where the caller estimated it (BOGC's ``microbatch`` estimator); rules that need no variance
    ignore it. ``group`` names the parameter group, for rules that keep state per group.
    """

    def combine(
        self, rows: Tensor, group: str = "", var: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, rows: Tensor, group: str = "", var: Tensor | None = None) -> Tensor:
        return self.combine(rows, group, var)[0]
