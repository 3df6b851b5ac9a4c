"""Model-free combining rules: a matrix of per-objective gradient rows in, one row out."""

from __future__ import annotations

from mmlearn.gradients.base import Rule
from mmlearn.gradients.bogc import BOGCCalibration, calibrate, ds_combine, fused_opinion
from mmlearn.gradients.mgda import MGDA, min_norm_weights
from mmlearn.gradients.sum import Sum

__all__ = [
    "BOGCCalibration",
    "MGDA",
    "Rule",
    "Sum",
    "calibrate",
    "ds_combine",
    "fused_opinion",
    "min_norm_weights",
]
