"""Training strategies, one LightningModule each, chosen on the CLI with ``--model <Name>``.

``InterOnly`` (joint fusion model), ``IntraOnly`` (unimodal experts), ``I2M2`` (their product),
``MIMO`` and ``BOGC`` (gradient-level balancing of fused and unimodal objectives),
``MultiObjective`` (any rule from :mod:`mmlearn.gradients` with any moments estimator from
:mod:`mmlearn.strategies.moments`, e.g. the ``MGDA`` baseline) and ``LateFusionHeads`` (the
reference: InterOnly with unimodal heads, the plain sum by automatic optimisation), and the
imbalance baselines ``OGMGE``, ``MMPareto`` and ``MLA``.
"""

from __future__ import annotations

from mmlearn.strategies.base import FUSED, JointModel, MultimodalModule, UnimodalExpert
from mmlearn.strategies.bogc import BOGC
from mmlearn.strategies.i2m2 import I2M2
from mmlearn.strategies.inter_only import InterOnly
from mmlearn.strategies.intra_only import IntraOnly
from mmlearn.strategies.late_fusion import LateFusionHeads
from mmlearn.strategies.mimo import MIMO
from mmlearn.strategies.mla import MLA
from mmlearn.strategies.mmpareto import MMPareto
from mmlearn.strategies.moments import BatchRows, EMAMoments, LastLayer, Microbatch, Moments
from mmlearn.strategies.multi_objective import MultiObjective
from mmlearn.strategies.ogm_ge import OGMGE

STRATEGIES: dict[str, type[MultimodalModule]] = {
    "InterOnly": InterOnly,
    "IntraOnly": IntraOnly,
    "I2M2": I2M2,
    "MIMO": MIMO,
    "BOGC": BOGC,
    "MultiObjective": MultiObjective,
    "LateFusionHeads": LateFusionHeads,
    "OGMGE": OGMGE,
    "MMPareto": MMPareto,
    "MLA": MLA,
}

__all__ = [
    "BOGC",
    "BatchRows",
    "EMAMoments",
    "LastLayer",
    "Microbatch",
    "Moments",
    "FUSED",
    "LateFusionHeads",
    "MIMO",
    "MLA",
    "MMPareto",
    "MultiObjective",
    "OGMGE",
    "I2M2",
    "STRATEGIES",
    "InterOnly",
    "IntraOnly",
    "JointModel",
    "MultimodalModule",
    "UnimodalExpert",
]
