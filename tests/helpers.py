"""Shared test constants and helpers (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import importlib
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.data import warning_cache

from mmlearn.data.base import MultimodalDataModule, Split
from mmlearn.strategies import STRATEGIES as REGISTERED


def require(condition: bool, why: str) -> None:
    """Skip the calling test (or fixture) unless ``condition``; under CI (``CI=true``), fail.

    For what CI provides (the prepared mfeat data, Debian's Fashion-MNIST and Slurm packages, the
    MiniLM package): there, a missing one is a broken CI, not a reason to skip. Not for what CI
    lacks on purpose (a GPU): that stays a plain skip.
    """
    __tracebackhide__ = True  # pytest reports the skip or failure at the caller
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must provide this: {why}")
    pytest.skip(why)


Options = dict[str, Any]


def spec(class_path: str, **init_args: Any) -> dict[str, Any]:
    """A class-valued option as a config writes it: ``{"class_path": ..., "init_args": ...}``."""
    return (
        {"class_path": class_path, "init_args": init_args}
        if init_args
        else {"class_path": class_path}
    )


def _is_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and "class_path" in value


def instantiate(options: Mapping[str, Any]) -> Options:
    """Constructor arguments from config-style options: each :func:`spec` built, fresh each call."""

    def build(value: Any) -> Any:
        if not _is_spec(value):
            return value
        module, _, name = value["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: build(v) for k, v in value.get("init_args", {}).items()})

    return {key: build(value) for key, value in options.items()}


def cli_args(strategy: str, options: Mapping[str, Any]) -> list[str]:
    """``--model <strategy> --model.<option>=<value> ...``: the CLI arguments of a strategy."""
    args = ["--model", strategy]
    for key, value in options.items():
        plain = _is_spec(value) and set(value) == {"class_path"}
        args.append(f"--model.{key}={value['class_path'] if plain else json.dumps(value)}")
    return args


#: strategies that are a registered class with options, for the tests that run every strategy
#: through the CLI: id -> (registered class name, options as a config writes them). MGDA, the
#: multi-objective baseline, is MultiObjective with its rule. (tests/distributed adds the variants
#: of every rule scope, moments estimator and ``every``, which it must check under DDP.)
VARIANTS: dict[str, tuple[str, Options]] = {
    "MGDA": ("MultiObjective", {"rule": spec("mmlearn.gradients.MGDA")}),
}
#: every strategy by id, as (registered class name, options): each class registered in
#: ``mmlearn.strategies.STRATEGIES`` with its defaults (a new one is covered by being registered),
#: then the variants
STRATEGY_OPTIONS: dict[str, tuple[str, Options]] = {
    name: (name, {}) for name in REGISTERED
} | VARIANTS
#: every strategy by id, as the CLI arguments that choose it
STRATEGY_ARGS: dict[str, list[str]] = {
    key: cli_args(cls, options) for key, (cls, options) in STRATEGY_OPTIONS.items()
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


def quiet_trainer(**kw: Any) -> pl.Trainer:
    """A quiet CPU Trainer: one epoch, no logger, checkpoints, progress bar or summary."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**(options | kw))


class Given(MultimodalDataModule):
    """A DataModule over given splits (``kw``: the base's options, e.g. ``batch_size``)."""

    def __init__(
        self, splits: dict[str, Split], k: int = 3, multilabel: bool = False, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self._given, self.k, self._multilabel = splits, k, multilabel

    @property
    def num_classes(self) -> int:
        return self.k

    @property
    def multilabel(self) -> bool:
        return self._multilabel

    def load_splits(self) -> dict[str, Split]:
        return self._given
