"""Metrics shared by every strategy (torchmetrics), keyed ``{stage}/{metric}[/{modality}]``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchmetrics import Metric, MetricCollection

from mmlearn.likelihood import likelihood

STAGES = ("train", "val", "test")


def _acc(num_classes: int, multilabel: bool) -> Metric:
    # multi-label: the share of (sample, label) decisions right at p > 0.5
    return likelihood(multilabel).accuracy(num_classes)


def final_metrics(num_classes: int, stage: str, multilabel: bool = False) -> MetricCollection:
    """Accuracy (micro) and macro-F1 of the strategy's final prediction.

    Fed :meth:`~mmlearn.likelihood.Likelihood.metric_input` of the log-probabilities ``[B, K]``
    and the targets (class indices ``[B]``, or multi-hot ``[B, K]`` when ``multilabel``).
    """
    lik = likelihood(multilabel)
    return MetricCollection(
        {"acc": lik.accuracy(num_classes), "f1": lik.f1(num_classes)}, prefix=f"{stage}/"
    )


def expert_metrics(
    num_classes: int, stage: str, modalities: Sequence[str], multilabel: bool = False
) -> MetricCollection:
    """Accuracy of each unimodal expert, logged as ``{stage}/acc/{modality}``."""
    return MetricCollection(
        {m: _acc(num_classes, multilabel) for m in modalities}, prefix=f"{stage}/acc/"
    )


def key(stage: str) -> str:
    """ModuleDict key of a stage (``"train"`` itself would shadow ``nn.Module.train``)."""
    return f"stage_{stage}"


def stage_metrics(
    num_classes: int, modalities: Sequence[str], with_experts: bool, multilabel: bool = False
) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """One final and (optionally) one per-expert collection per stage, keyed by :func:`key`."""
    final = nn.ModuleDict({key(s): final_metrics(num_classes, s, multilabel) for s in STAGES})
    experts = nn.ModuleDict(
        {key(s): expert_metrics(num_classes, s, modalities, multilabel) for s in STAGES}
        if with_experts
        else {}
    )
    return final, experts
