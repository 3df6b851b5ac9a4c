"""Metrics shared by every strategy (torchmetrics), keyed ``{stage}/{metric}[/{modality}]``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

STAGES = ("train", "val", "test")


def _acc(num_classes: int, multilabel: bool) -> Metric:
    # multi-label: the share of (sample, label) decisions right at p > 0.5
    if multilabel:
        return MultilabelAccuracy(num_classes, average="micro")
    return MulticlassAccuracy(num_classes, average="micro")


def final_metrics(num_classes: int, stage: str, multilabel: bool = False) -> MetricCollection:
    """Accuracy (micro) and macro-F1 of the strategy's final prediction."""
    f1: Metric = (
        MultilabelF1Score(num_classes, average="macro")
        if multilabel
        else MulticlassF1Score(num_classes, average="macro")
    )
    return MetricCollection({"acc": _acc(num_classes, multilabel), "f1": f1}, prefix=f"{stage}/")


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
