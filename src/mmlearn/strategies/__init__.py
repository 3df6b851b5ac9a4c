"""Training strategies, one LightningModule each, chosen on the CLI with ``--model <Name>``.

``InterOnly`` (joint fusion model), ``IntraOnly`` (unimodal experts), ``I2M2`` (their product).
"""

from __future__ import annotations

from mmlearn.strategies.base import FUSED, JointModel, MultimodalModule, UnimodalExpert
from mmlearn.strategies.i2m2 import I2M2
from mmlearn.strategies.inter_only import InterOnly
from mmlearn.strategies.intra_only import IntraOnly

STRATEGIES: dict[str, type[MultimodalModule]] = {
    "InterOnly": InterOnly,
    "IntraOnly": IntraOnly,
    "I2M2": I2M2,
}

__all__ = [
    "FUSED",
    "I2M2",
    "STRATEGIES",
    "InterOnly",
    "IntraOnly",
    "JointModel",
    "MultimodalModule",
    "UnimodalExpert",
]
