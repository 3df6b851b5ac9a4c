"""The LightningCLI behind ``mmlearn fit|validate|test|predict``.

Strategy and data are chosen by class (``--model I2M2 --data MultipleFeatures``); the modality
shapes and class count reach the model from the DataModule through ``link_arguments``. Where a
run's files go is decided by :mod:`mmlearn.run_folder`; the ``mmlearn`` command itself (project
commands, one-line errors) is :mod:`mmlearn.cli`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import mmlearn.data  # noqa: F401  (makes the DataModules resolvable by short name)
import mmlearn.strategies  # noqa: F401  (makes the strategies resolvable by short name)
from mmlearn.callbacks import Checkpoint, PredictionWriter, SlurmRequeue
from mmlearn.data.base import MultimodalDataModule
from mmlearn.run_folder import DEFAULT_ROOT, bound_training, place_run
from mmlearn.strategies.base import MultimodalModule

DESCRIPTION = """mmlearn: compare multi-modal learning strategies under one Lightning Trainer.

Lightning subcommands: fit, validate, test, predict (e.g. `mmlearn fit --config
experiments/mfeat/i2m2.yaml`). Runs go to <trainer.default_root_dir>/<Data>/<Strategy>/version_N
(default root: runs). Project commands: `mmlearn prepare mfeat --root data`,
`mmlearn compare experiments/mfeat/*.yaml --seeds 0 1 2 --out runs/compare`,
`mmlearn slurm experiments/mfeat/i2m2.yaml --gpus 4 --time 02:00:00 [--dry-run]`."""

TRAINER_DEFAULTS = {
    "log_every_n_steps": 10,
    "default_root_dir": DEFAULT_ROOT,
    # no save_dir: the run folder policy puts it under trainer.default_root_dir
    "logger": {"class_path": "mmlearn.loggers.CSVLogger"},
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
        """Place the run (:func:`~mmlearn.run_folder.place_run`) and bound its epochs."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        bound_training(cfg)
        kwargs = place_run(cfg, self.subcommand)
        if kwargs is not None:
            self.save_config_kwargs = kwargs

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
