"""Shared test constants and helpers (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.data import warning_cache

from mmlearn.strategies import STRATEGIES as REGISTERED

#: strategies that are a registered class with options: id -> (class name, CLI options)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "MGDA": ("MultiObjective", ["--model.rule=mmlearn.gradients.MGDA"]),
}
#: every strategy by id, as the CLI arguments that choose it: each class registered in
#: ``mmlearn.strategies.STRATEGIES`` with its defaults (a new one is covered by being registered),
#: then the variants (MGDA is MultiObjective with its rule)
STRATEGY_ARGS: dict[str, list[str]] = {name: ["--model", name] for name in REGISTERED} | {
    key: ["--model", cls, *options] for key, (cls, options) in VARIANTS.items()
}
# every strategy, as the CLI arguments that choose it (``ids=lambda s: s[1]`` names the class)
STRATEGIES = list(STRATEGY_ARGS.values())
assert all(cls in REGISTERED for cls, _ in VARIANTS.values())


def fit_recording_warnings(trainer: pl.Trainer, model: Any, data: Any) -> list[str]:
    """``trainer.fit(model, data)``; the messages of the warnings it raised."""
    warning_cache.clear()  # Lightning says each of its warnings once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
    return [str(w.message) for w in caught]
