"""MGDA: the minimum-norm point in the convex hull of the objectives' gradients.

Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", 2012;
Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 (the
Frank-Wolfe solver, Algorithm 2, and the closed form for two objectives, Algorithm 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmlearn.gradients.base import Rule


def min_norm_weights(gram: Tensor, iters: int = 50, tol: float = 1e-8) -> Tensor:
    """Simplex weights ``w [n]`` minimising ``w^T gram w``.

    Two objectives: the closed form ``w_1 = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1)``. More:
    Frank-Wolfe with exact line search, started from the uniform weights.
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
    w = torch.full((n,), 1.0 / n, dtype=gram.dtype, device=gram.device)
    for _ in range(iters):
        grad = gram @ w
        t = int(grad.argmin())
        # line search between w and the vertex e_t on the quadratic w^T G w
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


class MGDA(Rule):
    """``g = scale * sum_k w_k g_k`` with ``w`` the min-norm simplex weights.

    ``g`` has a non-negative inner product with every ``g_k`` (a common descent direction) and
    lies in their convex hull. Weights are solved per parameter group.

    Args:
        scale: multiplies the min-norm point. 1 is the paper's update; ``n`` (the number of
            objectives) puts its step size on the same footing as :class:`Sum`.
        normalize: scale each row to unit norm before solving (the "l2" normalisation of
            Sener and Koltun's code); the weights then apply to the original rows.
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
        if self.normalize:
            w = w / rows.double().norm(dim=1).clamp_min(1e-12) * r.norm(dim=1)
        return self.scale * (w.to(rows.dtype) @ rows), w.to(rows.dtype)
