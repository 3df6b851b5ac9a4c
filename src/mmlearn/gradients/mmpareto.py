"""MMPareto's combination of the fused and the unimodal gradient on each encoder.

Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024.
On encoder m the fused objective and modality m's unimodal objective both give a gradient. When
they agree in direction (positive cosine) the update is their plain sum; when they conflict it
is the Pareto (min-norm) combination, which has a non-negative inner product with both. Either
way the result is rescaled, tensor by tensor, so that it is never shorter than the plain sum,
and multiplied by ``gamma``: the min-norm point alone would be a small step, and the paper's
argument is that the larger step keeps the generalisation benefit of the unimodal gradient's
noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmlearn.errors import MMLearnError
from mmlearn.gradients.base import Block, Rule, ones
from mmlearn.gradients.mgda import min_norm_weights, row_gram


class MMParetoCombination(Rule):
    """Per group of ``n`` rows: equal weights if all rows agree, min-norm weights otherwise.

    For the two rows of an encoder (``g_0`` fused, ``g_m`` unimodal), exactly as the paper's
    training loop:

    1. ``w = (1/2, 1/2)`` if ``cos(g_0, g_m) > 0``; else the two-objective min-norm weights
       ``w_0 = (|g_m|^2 - g_0.g_m) / |g_0 - g_m|^2`` clipped to ``[clip, 1 - clip]``.
    2. ``new = 2 (w_0 g_0 + w_m g_m)``.
    3. Per parameter tensor t: ``g_t = gamma * max(1, |g_0,t + g_m,t| / |new_t|) * new_t``.

    Where ``|new_t| <= 1e-5 |g_0,t + g_m,t|`` (opposed gradients: the min-norm point is zero up to
    rounding) the tensor gets no step: the rescale would blow the rounding error up to the sum's
    norm in an arbitrary direction, and the paper's loop gives NaN when ``new_t`` is exactly 0.

    Generalisation to ``n`` rows (not in the paper, which has two per encoder): equal weights
    ``1/n`` if every pair of rows has a positive cosine, else the min-norm simplex weights of
    all ``n`` (:func:`~mmlearn.gradients.min_norm_weights`, exact up to 8) clipped to
    ``[clip, 1 - clip]`` and renormalised; ``new = n * sum_k w_k g_k``; the same rescale to the
    plain sum's norm. A group with one row (a head) gets that row unchanged, as in the paper,
    where the heads follow the summed loss.

    Args:
        gamma: the step multiplier (the paper's 1.5).
        clip: the min-norm weights are kept in ``[clip, 1 - clip]`` (the paper's solver: 0.001).

    ``__call__(rows [n, P]) -> (row [P], weights)``: ``weights`` is ``[n, P]``, the coefficient
    each row's entry gets (the clipped weight times ``n``, the tensor's rescale and ``gamma``),
    so re-applying them (``every > 1``) is linear in the rows; ``[1]`` for one row. The tensors
    are the group's parameters (:attr:`~mmlearn.gradients.Block.sizes`); without sizes the
    whole row is one tensor.
    """

    def __init__(self, gamma: float = 1.5, clip: float = 0.001) -> None:
        if not gamma > 0:
            raise MMLearnError(f"MMPareto: gamma={gamma}; expected > 0 (the paper's 1.5)")
        if not 0 <= clip < 0.5:
            raise MMLearnError(f"MMPareto: clip={clip}; expected 0 <= clip < 0.5 (paper: 0.001)")
        self.gamma, self.clip = float(gamma), float(clip)
        #: a tensor whose combined gradient is shorter than ``tiny`` times the plain sum's is
        #: Pareto-stationary up to rounding: it gets no step (see :meth:`__call__`)
        self.tiny = 1e-5

    def simplex_weights(self, rows: Tensor) -> Tensor:
        """``w [n]`` on the simplex: equal if every pair agrees, else clipped min-norm."""
        n = rows.shape[0]
        gram = row_gram(rows)
        norms = gram.diagonal().clamp_min(0).sqrt()
        cos = gram / (norms.unsqueeze(1) * norms).clamp_min(1e-300)
        off = ~torch.eye(n, dtype=torch.bool, device=gram.device)
        # a zero row has no direction: it does not agree (the paper's cosine is 0 there)
        agree = bool((cos[off] > 0).all()) and bool((norms > 0).all())
        if agree:
            return torch.full((n,), 1.0 / n, dtype=torch.float64, device=gram.device)
        w = min_norm_weights(gram).clamp(self.clip, 1 - self.clip)
        if n == 2:  # the paper's solver clips w_0 and sets w_m = 1 - w_0
            return torch.stack([w[0], 1 - w[0]])
        return w / w.sum()

    def __call__(
        self, rows: Tensor, var: Tensor | None = None, sizes: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        n, p = rows.shape
        if n == 1:
            return rows[0].clone(), ones(rows)
        w = (n * self.simplex_weights(rows)).to(rows.dtype)
        new = w @ rows
        plain = rows.sum(0)
        scale = torch.empty(p, dtype=rows.dtype, device=rows.device)
        start = 0
        for size in sizes if sizes is not None else (p,):
            t = slice(start, start + size)
            new_norm, plain_norm = new[t].norm(), plain[t].norm()
            if new_norm <= self.tiny * plain_norm:
                # (almost) exactly opposed gradients: the min-norm point is 0 up to rounding,
                # and rescaling that rounding to the sum's norm would be a step in a random
                # direction (the paper's loop gives NaN or noise here): no step for this tensor
                scale[t] = 0.0
            else:
                scale[t] = self.gamma * (plain_norm / new_norm).clamp_min(1.0)
            start += size
        if start != p:
            raise MMLearnError(f"MMPareto: parameter sizes sum to {start}, the rows have {p}")
        weights = w.unsqueeze(1) * scale
        return new * scale, weights

    def combine(self, blocks: Sequence[Block]) -> list[tuple[Tensor, Tensor]]:
        return [self(b.rows, b.var, b.sizes) for b in blocks]
