"""What a head's K logits mean: one class out of K, or K independent labels.

Every head of every strategy outputs K logits per sample. A :class:`Likelihood` turns them into
a distribution over the target and owns everything that depends on that choice: the training
loss, the log-probabilities, the negative log-likelihood, the decision, the normalised product
of experts, what the metrics are fed and which metrics they are, and the per-sample gradient of
the loss with respect to the logits. The strategies call it instead of branching on
``multilabel``; :func:`likelihood` picks the implementation from that flag.

- :class:`Categorical`: softmax over K classes, targets are class indices ``[B]`` (int64).
- :class:`Bernoulli`: K independent labels, targets are multi-hot ``[B, K]`` (0/1).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from mmlearn.errors import MMLearnError

#: Smallest prior frequency used in :meth:`Likelihood.prior_logits`: a class (or a label state)
#: never seen in training would otherwise give an infinite prior correction.
MIN_FREQUENCY = 1e-6


class Likelihood:
    """Base: how K logits per sample define ``p(target | logits)``.

    Subclasses implement the per-likelihood pieces; :meth:`product_of_experts` is shared, built
    on :meth:`_expert_term` (one expert's evidence) and :meth:`_normalise` (the renormalisation
    of the summed evidence).
    """

    #: whether targets are multi-hot ``[B, K]`` (else class indices ``[B]``)
    multilabel: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---- training and evaluation -----------------------------------------------------------
    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Scalar training loss (mean over the batch) of ``logits [B, K]`` against ``target``."""
        raise NotImplementedError

    def log_proba(self, logits: Tensor) -> Tensor:
        """Log-probabilities ``[B, K]`` in float32 (bf16 log-probabilities lose the tails)."""
        raise NotImplementedError

    def nll(self, log_probs: Tensor, target: Tensor) -> Tensor:
        """Scalar negative log-likelihood of ``target`` under :meth:`log_proba`-style output."""
        raise NotImplementedError

    def predicted(self, log_probs: Tensor) -> Tensor:
        """The decision of :meth:`log_proba`-style output, shaped like a target."""
        raise NotImplementedError

    def target_probability(self, logits: Tensor, target: Tensor) -> Tensor:
        """``[B]`` (float32): the probability each sample's logits give its own target.

        One label: ``softmax(z_i)[y_i]``. Several: the mean over the K labels of the
        probability of the label's true value (OGM-GE's confidence score, generalised).
        """
        raise NotImplementedError

    def residual(self, logits: Tensor, target: Tensor) -> Tensor:
        """``dL_i / dz_i`` ``[B, K]`` (float32): each sample's gradient of its own loss.

        ``L_i`` is sample i's term of :meth:`loss`, scaled so that :meth:`loss` is the mean of
        the ``L_i``; the closed-form last-layer moments (:mod:`mmlearn.strategies.moments`)
        multiply it by the layer's input.
        """
        raise NotImplementedError

    # ---- combining experts -----------------------------------------------------------------
    def prior_logits(self, frequencies: Tensor) -> Tensor:
        """The logits ``[K]`` (float32) of a head that knows only the prior ``p(y)``.

        They are what each calibrated expert's posterior carries from the prior, and what
        :meth:`product_of_experts` divides out. ``frequencies`` ``[K]`` are the training class
        frequencies (multi-label: the per-label positive rates); values are floored at
        :data:`MIN_FREQUENCY`.
        """
        raise NotImplementedError

    def _expert_term(self, logits: Tensor) -> Tensor:
        """One expert's additive evidence ``[B, K]`` (float32)."""
        raise NotImplementedError

    def _normalise(self, total: Tensor) -> Tensor:
        """Log-probabilities ``[B, K]`` of the summed evidence ``[B, K]``."""
        raise NotImplementedError

    def product_of_experts(
        self,
        logits: Mapping[str, Tensor],
        present: Mapping[str, Tensor | None] | None = None,
        prior_logits: Tensor | None = None,
    ) -> Tensor:
        """Normalised product of the experts' posteriors, optionally divided by the prior.

        Without a prior: ``p(y|x) ∝ prod_{m in S} p_m(y|x_m)`` over the experts S present for the
        sample. With ``prior_logits`` (from :meth:`prior_logits`): ``p(y|x) ∝ prod_{m in S}
        p_m(y|x_m) / p(y)^(|S|-1)``, the posterior under conditional independence of the
        experts' inputs given the label when each expert was calibrated on its own (each
        ``p_m`` contains the prior once; the product must contain it once). A sample with no
        expert present then gets the prior itself (``|S| = 0``), without it the uniform
        distribution.

        Args:
            logits: expert name -> logits ``[B, K]``.
            present: expert name -> bool ``[B]`` (or ``None``: present everywhere); an absent
                expert's term, and one factor of the prior, are dropped for that sample.
            prior_logits: ``[K]``, or ``None`` for no prior correction.

        Returns:
            log-probabilities ``[B, K]`` (float32).

        Raises:
            MMLearnError: no experts.
        """
        if not logits:
            raise MMLearnError("product_of_experts needs at least one expert")
        total: Tensor | None = None
        count: Tensor | float = 0.0  # experts present, per sample [B] (or for all samples)
        for name, z in logits.items():
            term = self._expert_term(z)
            mask = None if present is None else present.get(name)
            if mask is None:
                count = count + 1.0
            else:
                keep = mask.bool()
                # where, not a product with the mask: an absent expert's logits may be NaN or
                # inf (0 * nan is nan), and they must not reach the present experts' result
                term = torch.where(keep.unsqueeze(-1), term, torch.zeros_like(term))
                count = count + keep.to(term.dtype)
            total = term if total is None else total + term
        assert total is not None
        if prior_logits is not None:
            extra = torch.as_tensor(count, dtype=total.dtype, device=total.device) - 1.0
            # [B, 1] or a scalar: one factor of the prior fewer than the experts present
            extra = extra.unsqueeze(-1) if extra.dim() else extra
            total = total - extra * prior_logits.to(total)
        return self._normalise(total)

    # ---- metrics ---------------------------------------------------------------------------
    def metric_input(self, log_probs: Tensor) -> Tensor:
        """What the torchmetrics classes of :meth:`accuracy` and :meth:`f1` are fed ``[B, K]``."""
        raise NotImplementedError

    def accuracy(self, num_classes: int) -> Metric:
        """Micro accuracy over the decisions (multi-label: over all (sample, label) pairs)."""
        raise NotImplementedError

    def f1(self, num_classes: int) -> Metric:
        """Macro F1: the unweighted mean over the K classes (labels) of their F1."""
        raise NotImplementedError


def _check_frequencies(frequencies: Tensor) -> Tensor:
    f = torch.as_tensor(frequencies).detach().float()
    if f.dim() != 1 or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise MMLearnError(
            f"class frequencies {f.tolist()}: expected one finite value >= 0 per class, [K]"
        )
    return f


class Categorical(Likelihood):
    """One class out of K: ``p(y|z) = softmax(z)_y``; targets are class indices ``[B]``."""

    multilabel = False

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Softmax cross-entropy, mean over the batch."""
        return F.cross_entropy(logits, target)

    def log_proba(self, logits: Tensor) -> Tensor:
        """``log_softmax(z)`` ``[B, K]``."""
        return F.log_softmax(logits.float(), dim=-1)

    def nll(self, log_probs: Tensor, target: Tensor) -> Tensor:
        """``-mean_i log p(y_i)``."""
        return F.nll_loss(log_probs, target)

    def predicted(self, log_probs: Tensor) -> Tensor:
        """Class indices ``[B]`` (argmax)."""
        return log_probs.argmax(-1)

    def target_probability(self, logits: Tensor, target: Tensor) -> Tensor:
        p = torch.softmax(logits.float(), dim=-1)
        return p.gather(1, target.long().view(-1, 1)).squeeze(1)

    def residual(self, logits: Tensor, target: Tensor) -> Tensor:
        """``softmax(z) - onehot(y)`` ``[B, K]``."""
        p = torch.softmax(logits.float(), dim=-1)
        return p - F.one_hot(target, p.shape[-1]).to(p.dtype)

    def prior_logits(self, frequencies: Tensor) -> Tensor:
        """``log p(y)`` ``[K]``, ``p`` the frequencies normalised to sum 1."""
        f = _check_frequencies(frequencies)
        if not float(f.sum()) > 0:
            raise MMLearnError(f"class frequencies {f.tolist()} sum to 0")
        _warn_unseen(f, f > 0, "class")
        return (f / f.sum()).clamp_min(MIN_FREQUENCY).log()

    def _expert_term(self, logits: Tensor) -> Tensor:
        # each expert's normalised log-posterior: the sum is the log of the product
        return F.log_softmax(logits.float(), dim=-1)

    def _normalise(self, total: Tensor) -> Tensor:
        return total - torch.logsumexp(total, dim=-1, keepdim=True)

    def metric_input(self, log_probs: Tensor) -> Tensor:
        """The log-probabilities themselves (the multiclass metrics take their argmax)."""
        return log_probs

    def accuracy(self, num_classes: int) -> Metric:
        return MulticlassAccuracy(num_classes, average="micro")

    def f1(self, num_classes: int) -> Metric:
        return MulticlassF1Score(num_classes, average="macro")


class Bernoulli(Likelihood):
    """K independent labels: ``p(label k on | z) = sigmoid(z_k)``; targets multi-hot ``[B, K]``.

    "Log-probabilities" are ``log sigmoid(z)``: the log-probability of each label being on.
    """

    multilabel = True

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Binary cross-entropy, mean over samples and labels (integer or bool targets too)."""
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))

    def log_proba(self, logits: Tensor) -> Tensor:
        """``log sigmoid(z)`` ``[B, K]``."""
        return F.logsigmoid(logits.float())

    def nll(self, log_probs: Tensor, target: Tensor) -> Tensor:
        """Mean binary cross-entropy from ``log p(on)``: equals :meth:`loss` of the logits."""
        t = target.to(log_probs.dtype)
        # log(1 - p) = log(-expm1(log p)): no cancellation where p is close to 1
        log_not = torch.log((-torch.expm1(log_probs)).clamp_min(1e-12))
        return -(t * log_probs + (1 - t) * log_not).mean()

    def predicted(self, log_probs: Tensor) -> Tensor:
        """Multi-hot ``[B, K]`` (int64): label on where ``p > 0.5``."""
        return (log_probs.exp() > 0.5).long()

    def target_probability(self, logits: Tensor, target: Tensor) -> Tensor:
        p = torch.sigmoid(logits.float())
        t = target.to(p.dtype)
        return (t * p + (1 - t) * (1 - p)).mean(1)

    def residual(self, logits: Tensor, target: Tensor) -> Tensor:
        """``(sigmoid(z) - y) / K`` ``[B, K]``: the per-sample loss is the mean over K labels."""
        z = logits.float()
        return (torch.sigmoid(z) - target.to(z.dtype)) / z.shape[-1]

    def prior_logits(self, frequencies: Tensor) -> Tensor:
        """``logit p_k = log p_k - log(1 - p_k)`` ``[K]``, ``p_k`` the positive rates."""
        f = _check_frequencies(frequencies)
        if bool((f > 1).any()):
            raise MMLearnError(f"label frequencies {f.tolist()}: expected rates in [0, 1]")
        _warn_unseen(f, (f > 0) & (f < 1), "label")
        f = f.clamp(MIN_FREQUENCY, 1 - MIN_FREQUENCY)
        return f.log() - (-f).log1p()

    def _expert_term(self, logits: Tensor) -> Tensor:
        # per label, p(on)/p(off) of a product of Bernoulli posteriors multiply: logits add
        return logits.float()

    def _normalise(self, total: Tensor) -> Tensor:
        return F.logsigmoid(total)

    def metric_input(self, log_probs: Tensor) -> Tensor:
        """Probabilities: the multi-label metrics threshold them at 0.5 (they would squash
        log-probabilities, all <= 0, with a sigmoid and never decide a label on)."""
        return log_probs.exp()

    def accuracy(self, num_classes: int) -> Metric:
        return MultilabelAccuracy(num_classes, average="micro")

    def f1(self, num_classes: int) -> Metric:
        return MultilabelF1Score(num_classes, average="macro")


def likelihood(multilabel: bool) -> Likelihood:
    """:class:`Bernoulli` for multi-label data (multi-hot targets), else :class:`Categorical`."""
    return Bernoulli() if multilabel else Categorical()


def _warn_unseen(frequencies: Tensor, seen: Tensor, what: str) -> None:
    """Warn when a frequency is floored or capped: its prior factor is then a guess."""
    unseen = torch.nonzero(~seen).flatten().tolist()
    if unseen:
        warnings.warn(
            f"{what} {unseen} with training frequency {frequencies[unseen].tolist()}: their "
            f"prior is clamped to [{MIN_FREQUENCY}, 1 - {MIN_FREQUENCY}], so dividing it out of "
            "a product of independent experts moves them by a factor of up to "
            f"{1 / MIN_FREQUENCY:.0e} per extra modality",
            stacklevel=3,
        )
