"""Linear probes: how much of the label a frozen representation holds, linearly.

The linear-evaluation protocol of representation learning (e.g. Chen et al., SimCLR, ICML 2020;
per-modality encoders in OGM-GE, Peng et al., CVPR 2022): freeze the features, fit a multinomial
logistic regression (multi-label: one logistic regression per label) on the training split and
report its test accuracy. The features are standardised with the training mean and std, and the
convex objective

``mean_i CE(softmax(x_i W + b), y_i) + l2 * ||W||_F^2``

(multi-label: the mean binary cross-entropy per (sample, label)) is minimised by full-batch
L-BFGS in float64 from a zero start, so a fit is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmlearn.errors import MMLearnError, is_int
from mmlearn.likelihood import likelihood


def _features(features: Tensor, where: str, dim: int | None = None) -> Tensor:
    if features.dim() != 2 or features.shape[0] == 0:
        raise MMLearnError(
            f"{where}: features of shape {tuple(features.shape)}, expected [N, D] with N >= 1"
        )
    if dim is not None and features.shape[1] != dim:
        raise MMLearnError(f"{where}: features have {features.shape[1]} columns, the probe {dim}")
    x = features.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise MMLearnError(f"{where}: features hold NaN or infinite values")
    return x


def _target(target: Tensor, n: int, num_classes: int, multilabel: bool, where: str) -> Tensor:
    expected = (n, num_classes) if multilabel else (n,)
    if tuple(target.shape) != expected:
        raise MMLearnError(
            f"{where}: target of shape {tuple(target.shape)}, expected {list(expected)} "
            f"({'multi-hot' if multilabel else 'class indices'}) for {n} feature rows"
        )
    if multilabel:
        if bool(((target != 0) & (target != 1)).any()):
            raise MMLearnError(f"{where}: multi-label target holds values other than 0 and 1")
    elif target.is_floating_point() or bool(((target < 0) | (target >= num_classes)).any()):
        raise MMLearnError(
            f"{where}: labels in [{target.min().item()}, {target.max().item()}] "
            f"({target.dtype}), expected integer class indices in [0, {num_classes})"
        )
    return target.detach().long()


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Probe:
    """A fitted linear probe: ``z = ((x - mean) / std) @ weight + bias``.

    Attributes:
        mean: ``[D]`` training feature means.
        std: ``[D]`` training feature stds (1 where a feature is constant).
        weight: ``[D, K]``.
        bias: ``[K]``.
        multilabel: K independent labels (sigmoid) rather than one class of K (softmax).
    """

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor
    multilabel: bool = False

    def logits(self, features: Tensor) -> Tensor:
        """``[N, K]`` (float64) logits of ``features`` ``[N, D]``."""
        x = _features(features, "Probe", self.mean.shape[0])
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def log_proba(self, features: Tensor) -> Tensor:
        """``[N, K]`` (float32): ``log softmax`` (multi-label: ``log p(label on)``)."""
        return likelihood(self.multilabel).log_proba(self.logits(features))

    def accuracy(self, features: Tensor, target: Tensor) -> float:
        """Top-1 accuracy (multi-label: share of (sample, label) decisions right at p > 0.5)."""
        lik, k = likelihood(self.multilabel), self.weight.shape[1]
        y = _target(target, features.shape[0], k, self.multilabel, "Probe.accuracy")
        return float(lik.accuracy(k)(lik.metric_input(self.log_proba(features)), y))


def fit_probe(
    features: Tensor,
    target: Tensor,
    num_classes: int,
    multilabel: bool = False,
    l2: float = 1e-4,
    max_iter: int = 200,
) -> Probe:
    """Fit a linear probe (see the module docstring) on frozen ``features``.

    Args:
        features: ``[N, D]`` training features (detached and cast to float64).
        target: class indices ``[N]``, or multi-hot ``[N, K]`` when ``multilabel``.
        num_classes: K.
        multilabel: K independent labels.
        l2: weight of ``||W||^2`` (the bias is not penalised); it keeps the weights finite on
            separable data.
        max_iter: L-BFGS iterations at most.

    Raises:
        MMLearnError: features not ``[N, D]`` or not finite, a target of another length or
            shape, labels outside ``[0, K)``.
    """
    if not is_int(num_classes, 1 if multilabel else 2):
        raise MMLearnError(
            f"fit_probe: num_classes {num_classes!r}, expected an integer >= 2 (labels: >= 1)"
        )
    if not l2 >= 0 or not is_int(max_iter, 1):
        raise MMLearnError(f"fit_probe: l2 {l2!r} and max_iter {max_iter!r}: expected >= 0, >= 1")
    x = _features(features, "fit_probe")
    y = _target(target, x.shape[0], num_classes, multilabel, "fit_probe")
    mean, std = x.mean(0), x.std(0, correction=0)
    # a constant feature has std 0 (or rounding noise): leave it unscaled instead of inflating
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    lik = likelihood(multilabel)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = lik.loss(z @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)  # one step runs up to max_iter iterations
    return Probe(mean, std, weight.detach(), bias.detach(), multilabel)


def probe_accuracy(
    train_features: Tensor,
    train_target: Tensor,
    test_features: Tensor,
    test_target: Tensor,
    num_classes: int,
    multilabel: bool = False,
) -> float:
    """Test accuracy of a probe fitted on the training split (:func:`fit_probe` defaults)."""
    probe = fit_probe(train_features, train_target, num_classes, multilabel)
    return probe.accuracy(test_features, test_target)
