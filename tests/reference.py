"""Independent reference computations the tests compare mmlearn's numbers with.

Written from the formulas in the docstrings (and the papers they cite), using only the models'
sub-modules and plain torch/numpy: nothing here calls mmlearn's losses, gradient step, rules or
metrics. ``tests/`` is on ``sys.path`` through its conftest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
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


def rows_of(
    model: nn.Module,
    x: Mapping[str, Tensor],
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> dict[str, Tensor]:
    """``{group: [n_objectives, P]}`` by one autograd call per (objective, group).

    ``loss(z, y)`` is each objective's loss of its logits (multi-label: the mean binary CE).
    """
    losses = {k: loss(z, y) for k, z in late_outputs(model, x).items()}
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


def multilabel_ce(z: Tensor, y: Tensor) -> Tensor:
    """Mean binary cross-entropy of ``K`` independent logits, written out from the sigmoid."""
    p, t = torch.sigmoid(z), y.to(z.dtype)
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


# ---- MGDA: the min-norm point of the convex hull, by a generic solver ---------------------------
def min_norm_point(vectors: Tensor) -> Tensor:
    """Simplex weights ``w [n]`` minimising ``|sum_k w_k v_k|^2`` of the full vectors ``[n, P]``.

    scipy's SLSQP on the vectors themselves (no Gramian trick, no face enumeration), then the
    optimality conditions checked: ``v_k . d >= |d|^2`` for every k, with equality on the
    support, where ``d = sum_k w_k v_k`` (a common descent direction of minimum norm).
    """
    v = vectors.detach().double().numpy()
    v = v / max(float(np.abs(v).max()), 1e-300)  # the weights do not depend on the scale
    n = v.shape[0]
    res = minimize(
        lambda w: float(np.square(w @ v).sum()),
        np.full(n, 1.0 / n),
        jac=lambda w: 2 * v @ (w @ v),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(n)}],
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    w = np.clip(res.x, 0, None)
    w = w / w.sum()
    d = w @ v
    inner, sq = v @ d, float(d @ d)
    scale = float(np.square(v).sum(1).max())
    assert inner.min() >= sq - 1e-7 * scale, (res, inner, sq)  # descent for every objective
    assert inner[w > 1e-6].max() <= sq + 1e-7 * scale, (res, inner, sq)  # equality on the support
    return torch.from_numpy(w)


# ---- moving moments written out from their weights ----------------------------------------------
def ema_moments(history: list[Tensor], beta: float) -> tuple[Tensor, Tensor, float]:
    """``(mean, var, S)`` of ``history`` (oldest first) with weights ``beta^(t - i)``.

    ``S = sum_i beta^(t-i)``, ``mean = sum_i beta^(t-i) g_i / S`` and
    ``var = sum_i beta^(t-i) (g_i - mean)^2 / S``, formed directly from the weights.
    """
    t = len(history) - 1
    w = torch.tensor([beta ** (t - i) for i in range(t + 1)], dtype=torch.float64)
    past = torch.stack([g.double() for g in history])
    shape = (-1, *([1] * (past.dim() - 1)))
    s = float(w.sum())
    mean = (w.view(shape) * past).sum(0) / s
    var = (w.view(shape) * (past - mean) ** 2).sum(0) / s
    return mean, var, s


# ---- BOGC ----------------------------------------------------------------------------------
def ds_weights(
    var: Tensor, eps_rel: float = 1e-3, e_max: float = 1e3, *, subsample: int | None = None
) -> Tensor:
    """BOGC's per-dimension weights from the objectives' variances ``[n, P]``.

    Scale-free evidence ``e = m (1 + eps_rel) / (var + eps_rel m)`` clipped to ``[0, e_max]``,
    ``m`` the median of the POSITIVE entries of the whole group (objectives x dimensions; the
    lower median for an even count; every ``e = 1`` where no entry is positive) -> simple-support
    opinions fused by the reduced Dempster-Shafer rule, applied pairwise -> ``w = b + u / n``.
    With ``subsample`` set and more entries than that, the median is taken on the strided
    subsample ``flat[::ceil(numel / subsample)]``. In float64, accurate to ~1e-10 for evidence up
    to ~1e3 (``1 - C`` cancels for larger evidence: see :func:`ds_weights_exact`).
    """
    e = bogc_evidence(var, eps_rel, e_max, subsample=subsample)
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


# ---- BOGC: evidence, and the pairwise fusion in exact arithmetic -------------------------------
def bogc_evidence(
    var: Tensor, eps_rel: float = 1e-3, e_max: float = 1e3, *, subsample: int | None = None
) -> Tensor:
    """``e = m (1 + eps_rel) / (var + eps_rel m)`` clipped to ``[0, e_max]``, ``m`` the lower
    median of the positive entries of ``var`` (of ``flat[::ceil(numel / subsample)]`` above
    ``subsample`` entries); all ones where no entry is positive."""
    flat = var.detach().flatten().tolist()
    if subsample is not None and len(flat) > subsample:
        flat = flat[:: -(-len(flat) // subsample)]
    pos = sorted(v for v in flat if v > 0)
    if not pos:
        return torch.ones_like(var)
    m = pos[(len(pos) - 1) // 2]  # the lower median
    return (m * (1 + eps_rel) / (var.clamp_min(0) + eps_rel * m)).clamp(0, e_max)


def ds_weights_exact(var: Tensor, eps_rel: float = 1e-3, e_max: float = 1e3) -> Tensor:
    """:func:`ds_weights` with the pairwise reduced Dempster-Shafer fusion done in exact rational
    arithmetic (``fractions.Fraction``) on the float64 evidence: no cancellation in ``1 - C``
    however large the evidence. Small groups only (pure Python)."""
    from fractions import Fraction

    e = bogc_evidence(var.double(), eps_rel, e_max)
    n, p = e.shape
    out = torch.empty(n, p, dtype=torch.float64)
    for j in range(p):
        ej = [Fraction(float(x)) for x in e[:, j]]
        b = [ej[0] / (ej[0] + 1)] + [Fraction(0)] * (n - 1)
        u = 1 / (ej[0] + 1)
        for k in range(1, n):
            b2 = [Fraction(0)] * n
            b2[k], u2 = ej[k] / (ej[k] + 1), 1 / (ej[k] + 1)
            conflict = sum(b[i] * b2[j] for i in range(n) for j in range(n) if i != j)
            b = [(b[i] * b2[i] + b[i] * u2 + b2[i] * u) / (1 - conflict) for i in range(n)]
            u = u * u2 / (1 - conflict)
        for i in range(n):
            out[i, j] = float(b[i] + u / n)
    return out


# ---- products of separately calibrated experts, with the prior divided out ---------------------
def _present_matrix(
    names: list[str], n: int, present: Mapping[str, np.ndarray] | None
) -> np.ndarray:
    """Bool ``[M, N]``: expert m is present for sample i (all present where not given)."""
    rows = []
    for m in names:
        given = None if present is None else present.get(m)
        rows.append(np.ones(n, dtype=bool) if given is None else np.asarray(given, dtype=bool))
    return np.stack(rows)


def prior_divided_product(
    probs: Mapping[str, np.ndarray],
    prior: np.ndarray,
    present: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """``p(y|x) ∝ prod_{m in S_i} p_m(y|x_m) / p(y)^(|S_i| - 1)`` ``[N, K]``, in float64.

    ``probs``: expert -> posteriors ``[N, K]`` (rows sum to 1); ``prior``: ``p(y)`` ``[K]``;
    ``S_i``: the experts present for sample i. Formed as a plain product of probabilities (no
    logs), then normalised per sample; a sample with no expert present gets the prior.
    """
    names = list(probs)
    n, k = next(iter(probs.values())).shape
    keep = _present_matrix(names, n, present)
    p = np.asarray(prior, dtype=np.float64)
    out = np.empty((n, k))
    for i in range(n):
        s = [m for j, m in enumerate(names) if keep[j, i]]
        num = np.ones(k)
        for m in s:
            num = num * np.asarray(probs[m][i], dtype=np.float64)
        num = num / p ** (len(s) - 1)
        out[i] = num / num.sum()
    return out


def prior_divided_bernoulli(
    probs: Mapping[str, np.ndarray],
    rates: np.ndarray,
    present: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Per label k: ``p(on|x) ∝ prod_{m in S} q_mk / r_k^(|S|-1)`` against
    ``p(off|x) ∝ prod_{m in S} (1 - q_mk) / (1 - r_k)^(|S|-1)``, normalised over {on, off}.

    ``probs``: expert -> ``q_m = p_m(label on | x_m)`` ``[N, K]``; ``rates``: the labels' prior
    positive rates ``[K]``. Returns ``p(on|x)`` ``[N, K]`` in float64.
    """
    names = list(probs)
    n, k = next(iter(probs.values())).shape
    keep = _present_matrix(names, n, present)
    r = np.asarray(rates, dtype=np.float64)
    out = np.empty((n, k))
    for i in range(n):
        s = [m for j, m in enumerate(names) if keep[j, i]]
        on, off = np.ones(k), np.ones(k)
        for m in s:
            q = np.asarray(probs[m][i], dtype=np.float64)
            on, off = on * q, off * (1 - q)
        on, off = on / r ** (len(s) - 1), off / (1 - r) ** (len(s) - 1)
        out[i] = on / (on + off)
    return out
