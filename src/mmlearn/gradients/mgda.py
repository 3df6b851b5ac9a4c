"""MGDA: the minimum-norm point in the convex hull of the objectives' gradients.

Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", 2012;
Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 (the
Frank-Wolfe solver, Algorithm 2, and the closed form for two objectives, Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmlearn.errors import MMLearnError
from mmlearn.gradients.base import Block, Rule


def _frank_wolfe(gram: Tensor, w: Tensor, iters: int, tol: float) -> Tensor:
    """Frank-Wolfe with exact line search on ``w^T gram w`` over the simplex, from ``w``."""
    for _ in range(iters):
        t = int((gram @ w).argmin())
        d = -w.clone()
        d[t] += 1
        dgd = d @ gram @ d
        if dgd <= tol:
            break
        step = float((-(d @ gram @ w) / dgd).clamp(0, 1))
        if step * float(d.abs().max()) < tol:
            break
        w = w + step * d
    return w


def _exact_small(gram: Tensor) -> Tensor:
    """Exact minimiser for a few objectives: the best face minimiser over all supports.

    On support S the minimiser of ``w^T G w`` subject to ``sum w = 1`` solves the KKT system
    ``[[G_S, 1], [1^T, 0]] [w; lam] = [0; 1]``. Solved by least squares it is exact also when
    ``G_S`` is singular (opposed or collinear gradients, where the minimum can be 0): at the
    smallest support holding a global minimiser that minimiser is the system's unique solution
    and it is feasible, so the feasible face solution of least value is the global minimum.
    """
    n = gram.shape[0]
    best, best_val = None, float("inf")
    for mask in range(1, 2**n):
        idx = [i for i in range(n) if mask >> i & 1]
        k = len(idx)
        kkt = gram.new_zeros(k + 1, k + 1)
        kkt[:k, :k] = gram[idx][:, idx]
        kkt[:k, k] = kkt[k, :k] = 1
        rhs = gram.new_zeros(k + 1, 1)
        rhs[k] = 1
        w_s = torch.linalg.pinv(kkt) @ rhs
        w_s = w_s[:k, 0]
        if float(w_s.min()) < -1e-9:
            continue
        w = gram.new_zeros(n)
        w[idx] = w_s.clamp_min(0) / w_s.clamp_min(0).sum()
        val = float(w @ gram @ w)
        if val < best_val:
            best, best_val = w, val
    assert best is not None  # every vertex (|S| = 1) is feasible
    return best


def min_norm_weights(gram: Tensor, iters: int = 1000, tol: float = 1e-12) -> Tensor:
    """Simplex weights ``w [n]`` minimising ``w^T gram w`` (``gram = G G^T`` of the rows).

    Two objectives: the closed form ``w_1 = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1)``
    (Sener and Koltun, Algorithm 1). Up to 8: exact, by the face minimisers of every support
    (also on degenerate faces). More: Frank-Wolfe (their Algorithm 2) from the uniform weights.
    The weights do not depend on the gradients' scale: ``gram`` is divided by its largest
    diagonal entry first (so the tolerances are relative), and an all-zero ``gram`` (every
    gradient zero: every point of the hull is the minimum) gives uniform weights.
    """
    n = gram.shape[0]
    if n == 1:
        return torch.ones(1, dtype=gram.dtype, device=gram.device)
    top = gram.diagonal().max()
    if not top > 0:
        return torch.full((n,), 1.0 / n, dtype=gram.dtype, device=gram.device)
    gram = gram / top
    if n == 2:
        denom = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        if denom <= tol:  # identical gradients: any point of the hull is the same
            w1 = torch.tensor(0.5, dtype=gram.dtype, device=gram.device)
        else:
            w1 = ((gram[1, 1] - gram[0, 1]) / denom).clamp(0, 1)
        return torch.stack([w1, 1 - w1])
    if n <= 8:
        return _exact_small(gram)
    return _frank_wolfe(gram, torch.full((n,), 1.0 / n, dtype=gram.dtype), iters, tol)


SCOPES = ("global", "per_group")


def gramian(blocks: Sequence[Block]) -> tuple[Tensor, list[int]]:
    """``G = sum_g R_g R_g^T`` over the blocks, aligned by objective: ``([n, n], objectives)``.

    ``G[k, l]`` is the inner product of objectives k and l's gradients on the blocks' parameters
    (zero where an objective does not reach a block), computed one small matmul per block, never
    by concatenating full gradient vectors.
    """
    ids = sorted({k for b in blocks for k in b.objectives})
    pos = {k: i for i, k in enumerate(ids)}
    ref = blocks[0].rows
    gram = torch.zeros(len(ids), len(ids), dtype=torch.float64, device=ref.device)
    for b in blocks:
        idx = torch.tensor([pos[k] for k in b.objectives], device=ref.device)
        gram[idx.unsqueeze(1), idx] += row_gram(b.rows)
    return gram, ids


def row_gram(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` ``[n, n]`` in float64, by n(n+1)/2 dot products.

    A tall-skinny matmul of ``[n, P]`` by ``[P, n]`` measured 16 ms for n = 2, P = 1.6M on 2
    CPU cores, its three dot products 0.3 ms.
    """
    n = rows.shape[0]
    dots = {(i, j): torch.dot(rows[i], rows[j]) for i in range(n) for j in range(i, n)}
    return torch.stack(
        [torch.stack([dots[min(i, j), max(i, j)] for j in range(n)]) for i in range(n)]
    ).double()


def solve(gram: Tensor, normalize: bool) -> Tensor:
    """Min-norm simplex weights of ``gram``; with ``normalize``, of the unit-norm gradients."""
    if normalize:
        d = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
        gram = gram / (d.unsqueeze(1) * d)
    return min_norm_weights(gram)


class MGDA(Rule):
    """``g = scale * sum_k w_k g_k`` with ``w`` the min-norm simplex weights.

    ``g`` has a non-negative inner product with every ``g_k`` (a common descent direction) and
    lies in their convex hull (docs/methods.md section 6).

    Args:
        scale: multiplies the min-norm point. 1 is the paper's update; ``n`` (the number of
            objectives) puts its step size on the same footing as :class:`Sum`.
        normalize: solve for the weights on the gradients scaled to unit norm (the "l2" gradient
            normalisation of Sener and Koltun's code), then apply them to the ORIGINAL gradients,
            as their training loop does (it weights the unnormalised losses).
        scope: ``"global"`` (default, Sener and Koltun): ONE min-norm point over all objectives
            on the shared parameters, i.e. every group reached by more than one objective (the
            encoders), solved on the Gramian accumulated over those groups (:func:`gramian`);
            a group reached by one objective (a head) gets that objective's gradient times
            ``scale``. ``"per_group"``: a separate min-norm point in every group (a different
            method: each encoder balances only the objectives that reach it).
    """

    def __init__(self, scale: float = 1.0, normalize: bool = False, scope: str = "global") -> None:
        if scope not in SCOPES:
            raise MMLearnError(f"MGDA: scope={scope!r}; expected one of {list(SCOPES)}")
        if not scale > 0:
            raise MMLearnError(f"MGDA: scale={scale}; expected > 0")
        self.scale, self.normalize, self.scope = scale, normalize, scope

    def __call__(self, rows: Tensor, var: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w = solve(row_gram(rows), self.normalize).to(rows.dtype)
        return self.apply(rows, w), w

    def apply(self, rows: Tensor, weights: Tensor) -> Tensor:
        # the scale folded into the n weights: one pass over the rows
        return (self.scale * weights.to(rows.dtype)) @ rows

    def coefficients(self, weights: Tensor) -> Tensor | None:
        return self.scale * weights

    def combine(self, blocks: Sequence[Block]) -> list[tuple[Tensor, Tensor]]:
        shared = [b for b in blocks if len(b.objectives) > 1]
        if self.scope == "per_group" or not shared:
            return super().combine(blocks)
        gram, ids = gramian(shared)
        w = solve(gram, self.normalize)
        pos = {k: i for i, k in enumerate(ids)}
        out = []
        for b in blocks:
            wb = w[[pos[k] for k in b.objectives]] if len(b.objectives) > 1 else torch.ones(1)
            wb = wb.to(device=b.rows.device, dtype=b.rows.dtype)
            out.append((self.apply(b.rows, wb), wb))
        return out
