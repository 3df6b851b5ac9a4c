"""Classification heads and the product-of-experts rule shared by IntraOnly and I2M2."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmlearn.errors import MMLearnError, is_int, is_probability
from mmlearn.likelihood import likelihood


def make_head(
    in_dim: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0
) -> nn.Module:
    """``Linear(in_dim, K)``, or ``Linear -> ReLU -> Dropout -> Linear`` when ``hidden`` is set.

    A hidden layer after a concat fusion is what lets a joint model represent interactions across
    modalities (a linear head on ``cat(f_1, f_2)`` is additive in the modalities).

    Raises:
        MMLearnError: ``hidden < 0`` or ``dropout`` outside ``[0, 1)``.
    """
    if hidden is not None and not is_int(hidden, 0):
        raise MMLearnError(f"head: hidden={hidden!r}; expected a width >= 1 (null or 0: linear)")
    if not is_probability(dropout):
        raise MMLearnError(f"head: dropout={dropout!r}; expected a probability in [0, 1)")
    if not hidden:
        return nn.Linear(in_dim, num_classes)
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def all_present(present: Mapping[str, Tensor] | None) -> Tensor | None:
    """Bool ``[B]``: samples with every modality present (``None`` when nothing is missing)."""
    if not present:
        return None
    return torch.stack(list(present.values())).all(0)


def product_of_experts(
    logits: Mapping[str, Tensor],
    present: Mapping[str, Tensor | None] | None = None,
    multilabel: bool = False,
) -> Tensor:
    """Normalised product of experts: ``log p(y|x) = lsm(sum_k lsm(z_k))``.

    Each expert's log-posterior ``lsm(z_k)`` is summed and the sum renormalised, which equals
    ``lsm(sum_k z_k)`` (I2M2, Madaan et al., NeurIPS 2024, eq. for the combined posterior). The
    rule itself is :meth:`mmlearn.likelihood.Likelihood.product_of_experts`, which can also
    divide out the class prior.

    Args:
        logits: expert name -> logits ``[B, K]``.
        present: expert name -> bool ``[B]`` (or ``None``); an absent expert's term is dropped for
            that sample, and the result is still a normalised distribution. A sample with no expert
            present gets the uniform distribution.
        multilabel: K independent labels: the product of Bernoulli experts, renormalised per
            label, has logit ``sum_k z_k``; returns ``log sigmoid(sum_k z_k)`` (log p(present)).

    Returns:
        log-probabilities ``[B, K]``.
    """
    return likelihood(multilabel).product_of_experts(logits, present)
