"""The interface of a combining rule: per-objective gradient rows in, one row out.

Rules import no Lightning, keep no state and know nothing of models or parameter names: the manual
gradient step (:mod:`mmlearn.strategies.step`) hands them, per parameter group, the matrix of the
gradients of the objectives that reach that group, already averaged over ranks, and the moments
estimator's per-dimension variance where it has one (docs/methods.md section 9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Block:
    """One parameter group as a rule sees it.

    Attributes:
        rows: ``[n, P]`` the gradients of the ``n`` objectives that reach the group.
        objectives: the position of each row's objective in the strategy's objective list, so
            that rules solving over all groups at once (MGDA ``scope="global"``) can align them.
        var: ``[n, P]`` per-dimension variance of each row, or ``None`` where the moments
            estimator gives none.
        sizes: the number of entries of each parameter tensor of the group, in row order
            (they sum to ``P``), for rules that treat tensors apart (MMPareto's rescale), or
            ``None`` (the row is one tensor).
    """

    rows: Tensor
    objectives: tuple[int, ...]
    var: Tensor | None = None
    sizes: tuple[int, ...] | None = None


class Rule:
    """Combine ``rows [n, P]`` (one gradient per objective) into one update direction ``[P]``.

    ``__call__(rows, var) -> (row, weights)``: ``weights`` are ``[n]`` (one per objective) or
    ``[n, P]`` (per dimension); they are what the strategies log, and :meth:`apply` turns them
    back into the row, so the step can reuse them between recomputations (``every``).
    """

    #: whether the rule needs a per-dimension variance (a moments estimator that gives one)
    needs_variance: bool = False

    def __call__(self, rows: Tensor, var: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def apply(self, rows: Tensor, weights: Tensor) -> Tensor:
        """The row that ``weights`` (as returned by :meth:`__call__`) give for ``rows``."""
        if weights.dim() == 1:
            return weights.to(rows.dtype) @ rows
        return (weights.to(rows.dtype) * rows).sum(0)

    def coefficients(self, weights: Tensor) -> Tensor | None:
        """``c [n]`` with ``apply(rows, weights) == c @ rows`` for every ``rows``, or ``None``.

        Rules whose weights are one scalar per objective are linear in the rows: between
        recomputations the step then needs no rows, only one backward of ``sum_k c_k L_k``.
        Per-dimension weights (``[n, P]``) give ``None``.
        """
        return weights if weights.dim() == 1 else None

    def combine(self, blocks: Sequence[Block]) -> list[tuple[Tensor, Tensor]]:
        """``[(row [P_g], weights)]`` for every group; by default each group on its own."""
        return [self(b.rows, b.var) for b in blocks]


def ones(rows: Tensor) -> Tensor:
    """Unit weights ``[n]`` in the rows' dtype and device."""
    return torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)
