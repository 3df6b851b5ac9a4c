"""Shared test constants and helpers (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.data import warning_cache

# every strategy, as the CLI arguments that choose it (MGDA is MultiObjective with its rule)
STRATEGIES = [
    ["--model", "InterOnly"],
    ["--model", "IntraOnly"],
    ["--model", "I2M2"],
    ["--model", "MIMO"],
    ["--model", "BOGC"],
    ["--model", "MultiObjective", "--model.rule=mmlearn.gradients.MGDA"],
]


def fit_recording_warnings(trainer: pl.Trainer, model: Any, data: Any) -> list[str]:
    """``trainer.fit(model, data)``; the messages of the warnings it raised."""
    warning_cache.clear()  # Lightning says each of its warnings once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
    return [str(w.message) for w in caught]
