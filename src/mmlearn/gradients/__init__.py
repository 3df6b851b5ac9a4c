"""Model-free combining rules: a matrix of per-objective gradient rows in, one row out."""

from __future__ import annotations

from mmlearn.gradients.base import Block, Rule
from mmlearn.gradients.bogc import (
    BOGCCalibration,
    calibrate,
    ds_combine,
    evidence,
    fused_opinion,
    positive_median,
)
from mmlearn.gradients.mgda import MGDA, gramian, min_norm_weights
from mmlearn.gradients.sum import Sum

#: every combining rule mmlearn exports; the property tests run over this list
RULES: tuple[type[Rule], ...] = (Sum, MGDA, BOGCCalibration)

__all__ = [
    "BOGCCalibration",
    "Block",
    "MGDA",
    "RULES",
    "Rule",
    "Sum",
    "calibrate",
    "ds_combine",
    "evidence",
    "fused_opinion",
    "gramian",
    "min_norm_weights",
    "positive_median",
]
