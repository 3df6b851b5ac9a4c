"""Metrics shared by every strategy (torchmetrics), keyed ``{stage}/{metric}[/{modality}]``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

STAGES = ("train", "val", "test")


def final_metrics(num_classes: int, stage: str) -> MetricCollection:
    """Accuracy (micro) and macro-F1 of the strategy's final prediction."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=f"{stage}/",
    )


def expert_metrics(num_classes: int, stage: str, modalities: Sequence[str]) -> MetricCollection:
    """Accuracy of each unimodal expert, logged as ``{stage}/acc/{modality}``."""
    return MetricCollection(
        {m: MulticlassAccuracy(num_classes, average="micro") for m in modalities},
        prefix=f"{stage}/acc/",
    )


def key(stage: str) -> str:
    """ModuleDict key of a stage (``"train"`` itself would shadow ``nn.Module.train``)."""
    return f"stage_{stage}"


def stage_metrics(
    num_classes: int, modalities: Sequence[str], with_experts: bool
) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """One final and (optionally) one per-expert collection per stage, keyed by :func:`key`."""
    final = nn.ModuleDict({key(s): final_metrics(num_classes, s) for s in STAGES})
    experts = nn.ModuleDict(
        {key(s): expert_metrics(num_classes, s, modalities) for s in STAGES} if with_experts else {}
    )
    return final, experts
