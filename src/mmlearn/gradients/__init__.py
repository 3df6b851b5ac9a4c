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
from mmlearn.gradients.mmpareto import MMParetoCombination
from mmlearn.gradients.sum import Sum
from mmlearn.gradients.torchjd import TorchJD
from mmlearn.gradients.torchjd import available as _torchjd_available

#: every combining rule mmlearn exports; the property tests run over this list
RULES: tuple[type[Rule], ...] = (Sum, MGDA, BOGCCalibration, MMParetoCombination)
# TorchJD (torchjd's aggregators) needs the optional torchjd extra: it is always exported (and,
# without torchjd, refuses to be built, saying how to install it), and listed for the property
# tests only where torchjd and its default solver are installed (checked without importing them)
if _torchjd_available():
    RULES += (TorchJD,)

__all__ = [
    "BOGCCalibration",
    "Block",
    "MGDA",
    "MMParetoCombination",
    "RULES",
    "Rule",
    "Sum",
    "TorchJD",
    "calibrate",
    "ds_combine",
    "evidence",
    "fused_opinion",
    "gramian",
    "min_norm_weights",
    "positive_median",
]
