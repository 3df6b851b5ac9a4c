"""``mmlearn``: LightningCLI subcommands (fit, validate, test, predict) plus project commands.

Strategy and data are chosen by class (``--model I2M2 --data MultipleFeatures``); the modality
shapes and class count reach the model from the DataModule through ``link_arguments``. Project
commands: ``mmlearn prepare <dataset>``, ``mmlearn compare <configs...>`` and ``mmlearn slurm``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import mmlearn.data  # noqa: F401  (makes the DataModules resolvable by short name)
import mmlearn.strategies  # noqa: F401  (makes the strategies resolvable by short name)
from mmlearn.callbacks import Checkpoint, PredictionWriter, SlurmRequeue
from mmlearn.data.base import MultimodalDataModule
from mmlearn.errors import MMLearnError, user_error
from mmlearn.runtime import keep_freed_memory
from mmlearn.strategies.base import MultimodalModule

DESCRIPTION = """mmlearn: compare multi-modal learning strategies under one Lightning Trainer.

Lightning subcommands: fit, validate, test, predict (e.g. `mmlearn fit --config
experiments/mfeat/i2m2.yaml`). Project commands: `mmlearn prepare mfeat --root data`,
`mmlearn compare experiments/mfeat/*.yaml --seeds 0 1 2 --out runs/compare`,
`mmlearn slurm experiments/mfeat/i2m2.yaml --gpus 4 --time 02:00:00 [--dry-run]`."""

TRAINER_DEFAULTS = {
    "log_every_n_steps": 10,
    # where checkpoints go when no logger names a run folder (e.g. fast_dev_run)
    "default_root_dir": "runs",
    "logger": {
        "class_path": "mmlearn.loggers.CSVLogger",
        "init_args": {"save_dir": "runs"},
    },
}


class ConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder and logs the same config, nested, to W&B.

    An existing ``config.yaml`` with the very same content is the same run coming back (a Slurm
    requeue, a resume into its ``run_dir``) and is not an error; a different one still is, so no
    earlier run is overwritten. The W&B copy is written once, from rank 0 (Lightning calls
    ``save_config`` only there), with ``allow_val_change`` because a sweep agent has already set
    its own keys.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.already_saved and not self.overwrite:
            path = Path(trainer.log_dir or ".") / self.config_filename
            same = False
            if trainer.is_global_zero and path.is_file():
                ours = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                same = yaml.safe_load(path.read_text()) == ours
            self.overwrite = bool(trainer.strategy.broadcast(same))
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in wandb_loggers:
                logger.experiment.config.update(config, allow_val_change=True)


def _loggers(cfg: Namespace) -> Iterator[Namespace]:
    """The logger entries of a parsed config (one, a list, or none)."""
    logger = cfg.get("trainer", {}).get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, Namespace) and entry.get("init_args") is not None:
            yield entry


class MMLearnCLI(LightningCLI):
    """LightningCLI with the data -> model links, a checkpoint callback and one dir per run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="put everything of this run (config, checkpoints, metrics, Slurm's hpc "
            "checkpoints, W&B files) in exactly this folder; a requeued job passes the same one",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after `fit`, test the best checkpoint (by val/acc) in the same run and loggers",
        )
        for key in ("input_shapes", "num_classes", "multilabel"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(SlurmRequeue, "requeue")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}",
            }
        )

    def before_instantiate_classes(self) -> None:
        """Name the run: ``runs/<Data>/<Strategy>/version_N`` and W&B group ``<Data>/<Strategy>``.

        With ``run_dir`` every logger, the checkpoints and Lightning's ``default_root_dir`` (where
        Slurm's ``hpc_ckpt_*.ckpt`` go and are found again) point into that one folder.
        """
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        model = str(cfg.model.class_path).rsplit(".", 1)[-1]
        data = str(cfg.data.class_path).rsplit(".", 1)[-1]
        run_dir = cfg.get("run_dir")
        for logger in _loggers(cfg):
            kind = str(logger.class_path).rsplit(".", 1)[-1]
            args = logger.init_args
            if kind.endswith("WandbLogger"):
                args.group = args.get("group") or f"{data}/{model}"
                args.job_type = args.get("job_type") or self.subcommand
                args.tags = args.get("tags") or [data, model]
                if args.get("name") in (None, "lightning_logs"):
                    args.name = f"{model}-seed{cfg.get('seed_everything')}"
            if run_dir is not None and "save_dir" in args:
                args.save_dir = run_dir
                if kind.endswith(("CSVLogger", "TensorBoardLogger")):
                    args.name, args.version = "", ""
            elif kind.endswith("CSVLogger") and args.get("name") in (None, "lightning_logs"):
                args.name = f"{data}/{model}"
        if run_dir is not None:
            cfg.trainer.default_root_dir = run_dir
            if cfg.get("checkpoint") is not None and cfg.checkpoint.get("dirpath") is None:
                cfg.checkpoint.dirpath = os.path.join(run_dir, "checkpoints")
            if self.subcommand != "fit":  # keep the training config; record this one beside it
                self.save_config_kwargs = {
                    "config_filename": f"{self.subcommand}-config.yaml",
                    "overwrite": True,
                }

    def instantiate_classes(self) -> None:
        """Instantiate, then record data-derived choices (a table's class list) in the config.

        The run's ``config.yaml`` is written after this, so ``mmlearn test``/``predict`` from it
        map labels to the same indices even on a file that lacks some classes.
        """
        super().instantiate_classes()
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        classes = getattr(self.datamodule, "classes", None)
        args = cfg.data.get("init_args")
        if classes is not None and args is not None and "classes" in args and not args.classes:
            args.classes = list(classes)

    def after_fit(self) -> None:
        """``--test_after_fit``: test the best checkpoint; its metrics join the same run."""
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


def configs_first(args: Sequence[str]) -> list[str]:
    """Move every ``--config`` (in its order) before the other options, after the subcommand.

    jsonargparse applies arguments left to right, so an option given before a ``--config`` that
    sets the same key is silently lost. mmlearn reads config files first, then the options,
    wherever they stand: a W&B agent that sends ``--seed_everything=3 --config=x.yaml`` (its
    parameter order is not ours to choose) gets seed 3, as the user meant.
    """
    args = list(args)
    start = 1 if args and not args[0].startswith("-") else 0
    configs: list[str] = []
    others: list[str] = []
    i = start
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            configs += args[i : i + 2]
            i += 2
            continue
        (configs if args[i].startswith("--config=") else others).append(args[i])
        i += 1
    return args[:start] + configs + others


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> MMLearnCLI:
    """Construct (and by default run) the CLI on ``args`` (``--config`` files read first)."""
    # in-memory data needs no workers; compare passes args in-process on purpose
    # (a login node has srun on PATH: Lightning's hint to use it is noise for a local run)
    for pattern in (
        ".*many workers.*",
        ".*args parameter is intended.*",
        ".*LeafSpec.*",
        ".*The `srun` command is available.*",
    ):
        warnings.filterwarnings("ignore", pattern)
    return MMLearnCLI(
        MultimodalModule,
        MultimodalDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=ConfigSaver,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
        args=configs_first(sys.argv[1:] if args is None else args),
        run=run,
    )


def _project_commands() -> dict[str, Callable[[Sequence[str]], int]]:
    from mmlearn.evaluation.compare import compare_main
    from mmlearn.prepare import prepare_main
    from mmlearn.slurm import slurm_main

    return {"prepare": prepare_main, "compare": compare_main, "slurm": slurm_main}


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
    keep_freed_memory()
    try:
        if args and args[0] in ("prepare", "compare", "slurm"):
            sys.exit(_project_commands()[args[0]](args[1:]))
        check_choices(args)
        build_cli(None if argv is None else args)
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        print(f"mmlearn: error: {err}", file=sys.stderr)
        sys.exit(2)
