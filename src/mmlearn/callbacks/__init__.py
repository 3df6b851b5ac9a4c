"""Callbacks, one per file."""

from __future__ import annotations

from mmlearn.callbacks.checkpoint import Checkpoint
from mmlearn.callbacks.imbalance import ImbalanceMonitor
from mmlearn.callbacks.predictions import PredictionWriter
from mmlearn.callbacks.requeue import SlurmRequeue

__all__ = ["Checkpoint", "ImbalanceMonitor", "PredictionWriter", "SlurmRequeue"]
