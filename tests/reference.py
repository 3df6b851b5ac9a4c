"""Independent reference computations the tests compare mmlearn's numbers with.

Written from the formulas in the docstrings (and the papers they cite), using only the models'
sub-modules and plain torch/numpy: nothing here calls mmlearn's losses, gradient step, rules or
metrics. ``tests/`` is on ``sys.path`` through its conftest.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---- forward passes written out from the sub-modules -------------------------------------------
def late_outputs(model: nn.Module, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{"fused": z_J, m: h_m(phi_m(x_m))}`` of a late-fusion-with-heads model."""
    feats = {m: enc(x[m]) for m, enc in model.joint.encoders.items()}
    out = {"fused": model.joint.head(model.joint.fusion(feats))}
    return out | {m: model.heads[m](feats[m]) for m in feats}


def expert_logits(model: nn.Module, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{m: h_m(phi_m(x_m))}`` of the unimodal experts (IntraOnly, I2M2)."""
    return {m: e.head(e.encoder(x[m])) for m, e in model.experts.items()}


# ---- per-objective gradient rows -----------------------------------------------------------------
def groups_of(model: nn.Module) -> list[tuple[str, list[nn.Parameter], list[str]]]:
    """Which objectives reach which parameters: encoder m <- fused, m; heads <- their own."""
    mods = list(model.joint.encoders)
    out = [(f"encoder.{m}", list(model.joint.encoders[m].parameters()), ["fused", m]) for m in mods]
    fused = [*model.joint.fusion.parameters(), *model.joint.head.parameters()]
    out.append(("fused_head", fused, ["fused"]))
    return out + [(f"head.{m}", list(model.heads[m].parameters()), [m]) for m in mods]


def rows_of(model: nn.Module, x: Mapping[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    """``{group: [n_objectives, P]}`` by one autograd call per (objective, group)."""
    losses = {k: F.cross_entropy(z, y) for k, z in late_outputs(model, x).items()}
    rows = {}
    for name, params, objectives in groups_of(model):
        per = []
        for k in objectives:
            grads = torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True)
            flat = [
                (torch.zeros_like(p) if g is None else g).flatten()
                for p, g in zip(params, grads, strict=True)
            ]
            per.append(torch.cat(flat))
        rows[name] = torch.stack(per)
    return rows


# ---- BOGC ----------------------------------------------------------------------------------
def ds_weights(var: Tensor, eps: float = 1e-8, e_max: float = 1e3) -> Tensor:
    """BOGC's per-dimension weights from the objectives' variances ``[n, P]``.

    precision -> evidence (normalised by the group's mean precision, capped) -> simple-support
    opinions fused by the reduced Dempster-Shafer rule, applied pairwise -> ``w = b + u / n``.
    """
    lam = 1.0 / (var + eps)
    e = (lam / lam.mean()).clamp(max=e_max)
    n = e.shape[0]
    b = torch.zeros(n, *e.shape[1:], dtype=e.dtype)
    b[0], u = e[0] / (e[0] + 1), 1 / (e[0] + 1)
    for k in range(1, n):
        b2 = torch.zeros_like(b)
        b2[k], u2 = e[k] / (e[k] + 1), 1 / (e[k] + 1)
        conflict = sum(b[i] * b2[j] for i in range(n) for j in range(n) if i != j)
        b = (b * b2 + b * u2 + b2 * u) / (1 - conflict)
        u = u * u2 / (1 - conflict)
    return b + u / n


# ---- classification metrics ----------------------------------------------------------------
def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """F1 of each column of multi-hot ``[N, K]`` truth and decisions; 0 where it is 0/0."""
    tp = (y_true & y_pred).sum(0)
    fp = ((1 - y_true) & y_pred).sum(0)
    fn = (y_true & (1 - y_pred)).sum(0)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=np.int64)[labels]


def macro_f1(target: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Single-label macro-F1: per-class F1 (one-vs-rest), unweighted mean over the K classes."""
    return float(f1_per_class(one_hot(target, k), one_hot(pred, k)).mean())
