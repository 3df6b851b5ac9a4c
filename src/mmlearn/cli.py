"""``mmlearn``: LightningCLI subcommands (fit, validate, test, predict) plus project commands.

Strategy and data are chosen by class (``--model I2M2 --data MultipleFeatures``); the modality
shapes and class count reach the model from the DataModule through ``link_arguments``. Project
commands: ``mmlearn prepare <dataset>`` and ``mmlearn compare <configs...>``.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import mmlearn.data  # noqa: F401  (makes the DataModules resolvable by short name)
import mmlearn.strategies  # noqa: F401  (makes the strategies resolvable by short name)
from mmlearn.callbacks import PredictionWriter
from mmlearn.data.base import MultimodalDataModule
from mmlearn.errors import MMLearnError, user_error
from mmlearn.strategies.base import MultimodalModule

DESCRIPTION = """mmlearn: compare multi-modal learning strategies under one Lightning Trainer.

Lightning subcommands: fit, validate, test, predict (e.g. `mmlearn fit --config
experiments/mfeat/i2m2.yaml`). Project commands: `mmlearn prepare mfeat --root data`,
`mmlearn compare experiments/mfeat/*.yaml --seeds 0 1 2 --out runs/compare`."""

TRAINER_DEFAULTS = {
    "log_every_n_steps": 10,
    # where checkpoints go when no logger names a run folder (e.g. fast_dev_run)
    "default_root_dir": "runs",
    "logger": {
        "class_path": "mmlearn.loggers.CSVLogger",
        "init_args": {"save_dir": "runs"},
    },
}


class MMLearnCLI(LightningCLI):
    """LightningCLI with the data -> model links, a checkpoint callback and one dir per run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("input_shapes", "num_classes"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}",
            }
        )

    def before_instantiate_classes(self) -> None:
        """Name the default CSV logger's run folder ``runs/<Data>/<Strategy>/version_N``."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        logger = cfg.get("trainer", {}).get("logger")
        if not isinstance(logger, Namespace) or not str(logger.get("class_path", "")).endswith(
            "CSVLogger"
        ):
            return
        if logger.init_args.get("name") in (None, "lightning_logs"):
            model = str(cfg.model.class_path).rsplit(".", 1)[-1]
            data = str(cfg.data.class_path).rsplit(".", 1)[-1]
            logger.init_args.name = f"{data}/{model}"


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> MMLearnCLI:
    """Construct (and by default run) the CLI on ``args``."""
    # in-memory data needs no workers; compare passes args in-process on purpose
    for pattern in (".*many workers.*", ".*args parameter is intended.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    return MMLearnCLI(
        MultimodalModule,
        MultimodalDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
        args=list(args) if args is not None else None,
        run=run,
    )


def _project_commands() -> dict[str, Callable[[Sequence[str]], int]]:
    from mmlearn.evaluation.compare import compare_main
    from mmlearn.prepare import prepare_main

    return {"prepare": prepare_main, "compare": compare_main}


def _subclasses(base: type) -> dict[str, type]:
    found: dict[str, type] = {}
    subs: list[type] = base.__subclasses__()
    for sub in subs:
        found[sub.__name__] = sub
        found |= _subclasses(sub)
    return found


def _check_choice(value: object, base: type, what: str, origin: str) -> None:
    """Raise a clear error when ``value`` names no subclass of ``base`` (``--model``/``--data``)."""
    if isinstance(value, dict):
        value = value.get("class_path")
    if not isinstance(value, str) or value.endswith((".yaml", ".yml", ".json")) or "{" in value:
        return
    known = _subclasses(base)
    name = value.rsplit(".", 1)[-1]
    if name in known and (value == name or known[name].__module__ in value):
        return
    if "." in value:
        try:
            module, attr = value.rsplit(".", 1)
            cls: object = getattr(importlib.import_module(module), attr)
            if isinstance(cls, type) and issubclass(cls, base):
                return
        except (ImportError, AttributeError):
            pass
    raise MMLearnError(f"unknown {what} {value!r} (from {origin}); valid: {sorted(known)}")


def check_choices(args: Sequence[str]) -> None:
    """Check the strategy and DataModule names given on the command line or in ``--config``."""
    bases = {"model": (MultimodalModule, "strategy"), "data": (MultimodalDataModule, "data module")}
    for i, arg in enumerate(args):
        key, _, value = arg[2:].partition("=")
        if not arg.startswith("--") or (key not in bases and key != "config"):
            continue
        if not value and i + 1 < len(args):
            value = args[i + 1]
        if key in bases:
            _check_choice(value, *bases[key], origin=f"--{key}")
        elif Path(value).is_file():
            cfg = yaml.safe_load(Path(value).read_text()) or {}
            for k, (base, what) in bases.items():
                if isinstance(cfg, dict) and k in cfg:
                    _check_choice(cfg[k], base, what, origin=f"{value}, key {k!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``mmlearn`` console script.

    User errors (bad config, bad data) end the program with one ``mmlearn: error:`` line and
    exit status 2; anything else keeps its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in ("prepare", "compare"):
            sys.exit(_project_commands()[args[0]](args[1:]))
        check_choices(args)
        build_cli(None if argv is None else args)
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        print(f"mmlearn: error: {err}", file=sys.stderr)
        sys.exit(2)
