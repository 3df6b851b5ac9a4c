"""Callbacks, one per file."""

from __future__ import annotations

from mmlearn.callbacks.predictions import PredictionWriter

__all__ = ["PredictionWriter"]
