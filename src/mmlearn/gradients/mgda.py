"""MGDA: the minimum-norm point in the convex hull of the objectives' gradients.

Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", 2012;
Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 (the
Frank-Wolfe solver, Algorithm 2, and the closed form for two objectives, Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmlearn.gradients.base import Rule


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
    """
    n = gram.shape[0]
    if n == 1:
        return torch.ones(1, dtype=gram.dtype, device=gram.device)
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


class MGDA(Rule):
    """``g = scale * sum_k w_k g_k`` with ``w`` the min-norm simplex weights.

    ``g`` has a non-negative inner product with every ``g_k`` (a common descent direction) and
    lies in their convex hull. Weights are solved per parameter group.

    Args:
        scale: multiplies the min-norm point. 1 is the paper's update; ``n`` (the number of
            objectives) puts its step size on the same footing as :class:`Sum`.
        normalize: solve for the weights on the rows scaled to unit norm (the "l2" gradient
            normalisation of Sener and Koltun's code), then apply them to the ORIGINAL rows, as
            their training loop does (it weights the unnormalised losses).
    """

    def __init__(self, scale: float = 1.0, normalize: bool = False) -> None:
        self.scale, self.normalize = scale, normalize

    def combine(
        self, rows: Tensor, group: str = "", var: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r = rows.double()
        if self.normalize:
            r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
        w = min_norm_weights(r @ r.T)
        return self.scale * (w.to(rows.dtype) @ rows), w.to(rows.dtype)
