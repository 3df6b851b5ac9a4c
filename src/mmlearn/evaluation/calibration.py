"""How trustworthy a predictor's probabilities are: NLL, ECE, Brier score, AUROC/AUPRC.

Inputs are :meth:`mmlearn.likelihood.Likelihood.log_proba`-style log-probabilities ``[N, K]``:
single-label (``multilabel=False``): ``log softmax``, targets class indices ``[N]``; multi-label:
``log p(label k on)``, targets multi-hot ``[N, K]``. Every (sample, label) pair of a multi-label
task is one binary decision for the ECE and the reliability diagram.

- NLL: ``-mean_i log p(y_i)`` (multi-label: the mean binary cross-entropy per (sample, label)).
- ECE (Naeini et al., AAAI 2015; Guo et al., ICML 2017): ``sum_b |B_b|/N |acc(B_b) - conf(B_b)|``
  over equal-width confidence bins; single-label on the top-label confidence.
- Brier score (Brier, 1950): ``mean_i sum_k (p_ik - y_ik)^2``, ``y`` one-hot (or multi-hot).
- AUROC / AUPRC (average precision): binary tasks (``K == 2``, score ``p(class 1)``) and the
  macro mean over the labels of a multi-label task.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryCalibrationError,
    MulticlassCalibrationError,
    MultilabelAUROC,
    MultilabelAveragePrecision,
)

from mmlearn.errors import MMLearnError
from mmlearn.likelihood import likelihood

#: equal-width confidence bins of the ECE and the reliability diagram (Guo et al. use 15)
N_BINS = 15


def _checked(
    log_probs: Tensor, target: Tensor, multilabel: bool, where: str
) -> tuple[Tensor, Tensor]:
    """Validate shapes and values; returns probabilities ``[N, K]`` (float32), int64 target."""
    if log_probs.dim() != 2 or not log_probs.is_floating_point() or log_probs.shape[0] == 0:
        raise MMLearnError(
            f"{where}: log_probs of shape {tuple(log_probs.shape)} ({log_probs.dtype}): expected "
            "floating log-probabilities [N, K] with N >= 1"
        )
    n, k = log_probs.shape
    if bool(torch.isnan(log_probs).any()) or bool((log_probs > 1e-4).any()):
        raise MMLearnError(f"{where}: log_probs hold NaN or values > 0: not log-probabilities")
    expected = (n, k) if multilabel else (n,)
    if tuple(target.shape) != expected:
        raise MMLearnError(
            f"{where}: target of shape {tuple(target.shape)}, expected {list(expected)} "
            f"({'multi-hot' if multilabel else 'class indices'}) for log_probs [{n}, {k}]"
        )
    if multilabel and bool(((target != 0) & (target != 1)).any()):
        raise MMLearnError(f"{where}: multi-label target holds values other than 0 and 1")
    if not multilabel:
        if target.is_floating_point() or bool(((target < 0) | (target >= k)).any()):
            raise MMLearnError(
                f"{where}: target labels in [{target.min().item()}, {target.max().item()}] "
                f"({target.dtype}): expected integer class indices in [0, {k})"
            )
    # clamp: a log-probability of +1e-5 (rounding) must not become a probability above 1
    return log_probs.float().exp().clamp_max(1.0), target.long()


def _ece(p: Tensor, target: Tensor, multilabel: bool, n_bins: int) -> float:
    if multilabel:  # each (sample, label) pair is one binary decision
        ce = BinaryCalibrationError(n_bins=n_bins, norm="l1")
        return float(ce(p.flatten(), target.flatten()))
    top = MulticlassCalibrationError(num_classes=p.shape[1], n_bins=n_bins, norm="l1")
    return float(top(p, target))  # top-label confidence: the max probability and its hit


def _ranking(p: Tensor, target: Tensor, multilabel: bool) -> dict[str, float]:
    """AUROC and AUPRC; labels whose target is constant are left out (both are undefined there:
    torchmetrics would average in a 0), and a binary task with one class present gets NaN."""
    y = target
    if not multilabel:
        if y.unique().numel() < 2:
            return {"auroc": math.nan, "auprc": math.nan}
        score = p[:, 1]
        auroc, auprc = BinaryAUROC()(score, y), BinaryAveragePrecision()(score, y)
        return {"auroc": float(auroc), "auprc": float(auprc)}
    positives = y.sum(0)
    kept = torch.nonzero((positives > 0) & (positives < y.shape[0])).flatten()
    if kept.numel() < y.shape[1]:
        dropped = sorted(set(range(y.shape[1])) - set(kept.tolist()))
        warnings.warn(
            f"labels {dropped} are constant in the target: left out of the macro AUROC/AUPRC",
            stacklevel=3,
        )
    if kept.numel() == 0:
        return {"auroc": math.nan, "auprc": math.nan}
    p, y, m = p[:, kept], y[:, kept], int(kept.numel())
    auroc = MultilabelAUROC(num_labels=m, average="macro")(p, y)
    auprc = MultilabelAveragePrecision(num_labels=m, average="macro")(p, y)
    return {"auroc": float(auroc), "auprc": float(auprc)}


def calibration(
    log_probs: Tensor, target: Tensor, multilabel: bool, n_bins: int = N_BINS
) -> dict[str, float]:
    """NLL, ECE and Brier score, and for binary and multi-label tasks AUROC and AUPRC.

    Args:
        log_probs: ``[N, K]`` log-probabilities (see the module docstring).
        target: class indices ``[N]`` (int), or multi-hot ``[N, K]`` when ``multilabel``.
        multilabel: whether the K outputs are independent labels.
        n_bins: equal-width confidence bins of the ECE.

    Returns:
        ``nll``, ``ece``, ``brier``; ``auroc`` and ``auprc`` only when ``K == 2`` or
        ``multilabel``.

    Raises:
        MMLearnError: bad shapes, no samples, labels out of range.
    """
    p, y = _checked(log_probs, target, multilabel, "calibration")
    hot = y if multilabel else F.one_hot(y, p.shape[1])
    out = {
        "nll": float(likelihood(multilabel).nll(log_probs.float(), y)),
        "ece": _ece(p, y, multilabel, n_bins),
        "brier": float((p.double() - hot.double()).square().sum(1).mean()),
    }
    if multilabel or p.shape[1] == 2:
        out |= _ranking(p, y, multilabel)
    return out


def reliability(
    log_probs: Tensor, target: Tensor, multilabel: bool, n_bins: int = N_BINS
) -> dict[str, list[float]]:
    """The data of a reliability diagram: per confidence bin its mean confidence, accuracy, count.

    The bins are the ECE's (``[b/n, (b+1)/n)``, torchmetrics' rule), so
    ``sum_b count_b / N * |accuracy_b - confidence_b|`` is :func:`calibration`'s ``ece``. One
    exception: torchmetrics counts confidences of exactly 1.0 in a bin of their own, here they
    are in the last bin. Empty bins have confidence and accuracy 0 and count 0.

    Returns:
        ``confidence``, ``accuracy``, ``count``: ``n_bins`` values each, lowest bin first.
    """
    p, y = _checked(log_probs, target, multilabel, "reliability")
    if multilabel:
        conf, hit = p.flatten(), y.flatten().double()
    else:
        conf, pred = p.max(1)
        hit = (pred == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    index = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    total = count.clamp_min(1)
    confidence = torch.bincount(index, conf.double(), minlength=n_bins) / total
    accuracy = torch.bincount(index, hit, minlength=n_bins) / total
    return {
        "confidence": confidence.tolist(),
        "accuracy": accuracy.tolist(),
        "count": count.tolist(),
    }


# Drawing only: the numbers come from `reliability` and `calibration`, which the tests cover.
# pragma: no mutate start
def plot_reliability(
    curves: Mapping[str, tuple[Tensor, Tensor]], multilabel: bool, path: str | Path, title: str = ""
) -> Path:
    """One reliability diagram PNG: accuracy vs mean confidence per bin, one line per curve.

    Args:
        curves: name -> ``(log_probs [N, K], target)``, as for :func:`calibration`.
        multilabel: whether the targets are multi-hot.
        path: the PNG to write.
        title: the figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not curves:
        raise MMLearnError(
            "plot_reliability: no curves given, expected name -> (log_probs, target)"
        )
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    for i, (name, (log_probs, target)) in enumerate(curves.items()):
        bins = reliability(log_probs, target, multilabel)
        used = [b for b, c in enumerate(bins["count"]) if c > 0]  # empty bins have no point
        ece = _ece(*_checked(log_probs, target, multilabel, "plot_reliability"), multilabel, N_BINS)
        ax.plot(
            [bins["confidence"][b] for b in used],
            [bins["accuracy"][b] for b in used],
            marker="o",
            ms=3,
            color=f"C{i}",
            label=f"{name} (ECE {ece:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("p(label on)" if multilabel else "confidence (top-label probability)")
    ax.set_ylabel("frequency of label on" if multilabel else "accuracy")
    ax.set_title(title or "reliability diagram", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# pragma: no mutate end
