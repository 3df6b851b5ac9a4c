"""The LightningCLI behind ``mmlearn fit|validate|test|predict``.

Strategy and data are chosen by class (``--model I2M2 --data MultipleFeatures``); the modality
shapes and class count reach the model from the DataModule through ``link_arguments``. Where a
run's files go, and what a run folder is, is decided by :mod:`mmlearn.run_folder`; the ``mmlearn``
command itself (project commands, one-line errors) is :mod:`mmlearn.cli`.

A checkpoint given with ``--ckpt_path`` is read before anything is built: an unreadable file, or
one of another strategy, other modalities, input shapes or class count than the config, is a user
error naming both sides. Model options the checkpoint records take the place of the config's (the
weights need them), and the ones that differ are said in one line.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    ModelCheckpoint,
    ModelSummary,
    ProgressBar,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

import mmlearn.data  # noqa: F401  (makes the DataModules resolvable by short name)
import mmlearn.strategies  # noqa: F401  (makes the strategies resolvable by short name)
from mmlearn.callbacks import Checkpoint, PredictionWriter, SlurmRequeue
from mmlearn.data.base import MultimodalDataModule
from mmlearn.errors import MMLearnError
from mmlearn.run_folder import (
    DEFAULT_ROOT,
    RUN_CONFIG,
    RunFolderError,
    another_run,
    bound_training,
    check_run_folder,
    config_differences,
    find_run,
    place_run,
    shown,
)
from mmlearn.strategies.base import MultimodalModule, check_modalities

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
#: the model options linked from the DataModule: checked against a checkpoint once it is built
LINKED = ("input_shapes", "num_classes", "multilabel")

log = logging.getLogger(__name__)


# ---- a quiet console -----------------------------------------------------------------------------
class _NoTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silence Lightning's tips and the warnings that are noise for mmlearn (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    # in-memory data needs no workers; compare passes args in-process on purpose
    # (a login node has srun on PATH: Lightning's hint to use it is noise for a local run)
    for pattern in (
        ".*many workers.*",
        ".*args parameter is intended.*",
        ".*LeafSpec.*",
        ".*The `srun` command is available.*",
    ):
        warnings.filterwarnings("ignore", pattern)


_BarMetrics = dict[str, int | str | float | dict[str, float]]


class RichBar(RichProgressBar):
    """Lightning's rich progress bar without ``v_num`` (the run is named at the end instead)."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> _BarMetrics:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class TQDMBar(TQDMProgressBar):
    """Lightning's tqdm progress bar without ``v_num``."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> _BarMetrics:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class Summary(ModelSummary):
    """Lightning's model summary without the FLOPs column when nothing was counted.

    Lightning counts FLOPs only through ``example_input_array``, which no strategy has (its input
    is a dict of modalities): the column would be zeros.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if not total_flops:
            summary_data = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters,
            trainable_parameters,
            model_size,
            total_training_modes,
            total_flops,
            *summary_data,
        )
        if not total_flops:
            table = table.rsplit("\n", 1)[0]  # its last line: "0  Total Flops"
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + table)


# ---- the run's config ----------------------------------------------------------------------------
class ConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder and logs the same config, nested, to W&B.

    An existing ``config.yaml`` of the same run (the same config up to where its files go: a
    Slurm requeue, a resume in place) is kept; one that differs only in the training budget
    (``--trainer.max_epochs`` of a resumed run) is replaced; any other is a
    :class:`~mmlearn.run_folder.RunFolderError` naming the folder and the differing keys, so no
    earlier run is overwritten. With ``overwrite`` (a ``test``'s ``test-config.yaml``) it is
    always written. The W&B copy is written once, from rank 0, with ``allow_val_change`` because
    a sweep agent has already set its own keys.
    """

    def _decide(self, path: Path) -> str:
        """``write``, ``keep``, ``update`` (its budget) or ``error: <message>`` for ``path``."""
        if self.overwrite or not path.is_file():
            return "write"
        ours = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        theirs = yaml.safe_load(path.read_text()) or {}
        if not config_differences(theirs, ours):
            return "keep"
        error = another_run(path.parent, theirs, ours, path.name)
        return "update" if error is None else f"error: {error}"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        path = Path(trainer.log_dir or ".") / self.config_filename
        decision = self._decide(path) if trainer.is_global_zero else "keep"
        decision = trainer.strategy.broadcast(decision)
        if decision.startswith("error: "):
            raise RunFolderError(decision.removeprefix("error: "))
        if trainer.is_global_zero:
            if decision == "update":
                self._update_budget(path)
            if decision == "write":
                path.parent.mkdir(parents=True, exist_ok=True)
                self.parser.save(
                    self.config,
                    str(path),
                    skip_none=False,
                    overwrite=True,
                    multifile=self.multifile,
                )
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def _update_budget(self, path: Path) -> None:
        """Write this run's budget (``trainer.max_epochs``, ...) into its existing config.

        The rest of the file stays as the run's first fit wrote it, where its files went
        included: a resumed run's config is still the run's, not that of the command resuming it.
        """
        ours = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        saved = yaml.safe_load(path.read_text()) or {}
        for key, _, value in config_differences(saved, ours):
            *parents, leaf = key.split(".")
            node = saved
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        path.write_text(yaml.safe_dump(saved, sort_keys=False))

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in wandb_loggers:
                logger.experiment.config.update(config, allow_val_change=True)


# ---- the checkpoint, read before anything is built -----------------------------------------------
def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded on the CPU as the Trainer loads it.

    Raises:
        MMLearnError: no such file, an empty, truncated or corrupt file, or no Lightning
            checkpoint (no ``state_dict``).
    """
    where = f"--ckpt_path {path}"
    file = Path(path)
    if not file.is_file():
        raise MMLearnError(f"{where}: no such file" + (" (a folder)" if file.is_dir() else ""))
    if file.stat().st_size == 0:
        raise MMLearnError(f"{where}: the file is empty (0 bytes), not a checkpoint")
    if not zipfile.is_zipfile(file):
        raise MMLearnError(
            f"{where}: not a checkpoint: not the zip archive torch.save writes (a truncated or "
            f"corrupt file, or another kind of file; {file.stat().st_size} bytes)"
        )
    try:
        checkpoint = pl_load(path, map_location="cpu")
    except Exception as exc:  # torch reports a bad file as RuntimeError, EOFError, pickle errors
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        raise MMLearnError(
            f"{where}: cannot be read as a checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}: {reason}"
        ) from exc
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise MMLearnError(f"{where}: not a Lightning checkpoint (it has no 'state_dict')")
    return dict(checkpoint)


def _import_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(__import__(module, fromlist=[name]), name) if module else None
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def _same_class(a: str, b: str) -> bool:
    """Whether two class paths (``mmlearn.strategies.I2M2``, ``...i2m2.I2M2``) name one class."""
    ca, cb = _import_class(a), _import_class(b)
    if ca is not None and cb is not None:
        return ca is cb
    return a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1]


def _plain(value: Any) -> Any:
    """A config value as YAML would hold it (namespaces as dicts, tuples as lists)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MMLearnCLI(LightningCLI):
    """LightningCLI with the data -> model links, a checkpoint callback and one folder per run."""

    _checkpoint_hparams: dict[str, Any] | None = None
    _checkpoint_path: str | None = None

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
        for key in LINKED:
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

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` and refuse a checkpoint of another strategy, then take its options.

        Replaces Lightning's, which loads the checkpoint's hyperparameters into the config
        without a word, including another strategy class. Here the class must be the config's;
        the model options the checkpoint records still replace the config's (its weights were
        trained with them), and those that differ are named in one line. The options linked from
        the data are checked once the DataModule is built (:meth:`instantiate_classes`).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in ("best", "last", "hpc", "registry"):
            return
        if "://" in str(ckpt_path):  # a remote file: Lightning reads it
            return super()._parse_ckpt_path()
        checkpoint = read_checkpoint(str(ckpt_path))
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        self._checkpoint_path, self._checkpoint_hparams = str(ckpt_path), hparams
        theirs = hparams.pop("_class_path", None)
        ours = str(cfg.model.get("class_path", ""))
        if theirs is not None and ours and not _same_class(str(theirs), ours):
            short = str(theirs).rsplit(".", 1)[-1]
            raise MMLearnError(
                f"--ckpt_path {ckpt_path}: the checkpoint holds a model of strategy {short} "
                f"({theirs}), the config asks for {ours.rsplit('.', 1)[-1]} (model.class_path "
                f"{ours}); use the config of the checkpoint's run, or --model {short}"
            )
        given = cfg.model.get("init_args")
        if theirs is None or given is None:
            return
        # the options of the class (an option an older version had is not passed on)
        options = {k: v for k, v in hparams.items() if k not in LINKED and k in given}
        changed = [
            f"{k}={_plain(v)!r} (the config: {_plain(given.get(k))!r})"
            for k, v in options.items()
            if _plain(given.get(k)) != _plain(v)
        ]
        if changed:
            rank_zero_info(
                "mmlearn: the checkpoint's model options replace the config's: "
                + ", ".join(changed)
            )
        model = {"class_path": theirs, "dict_kwargs": options}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _set_seed(self) -> None:
        """Lightning's seeding, without its warning when no seed is given (0, as it would take)."""
        if self._get(self.config, "seed_everything") in (True, None) and not os.environ.get(
            "PL_GLOBAL_SEED"
        ):
            target = self.config[self.subcommand] if self.subcommand else self.config
            target["seed_everything"] = 0
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        """Check the bounds (:func:`~mmlearn.run_folder.bound_training`) and place the run."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        bound_training(cfg, self.subcommand)
        kwargs = place_run(cfg, self.subcommand)
        if kwargs is not None:
            self.save_config_kwargs = kwargs

    def instantiate_classes(self) -> None:
        """Instantiate, check the model against ``--ckpt_path``, record the data's class list.

        The run's ``config.yaml`` is written after this, so ``mmlearn test``/``predict`` from it
        map labels to the same indices even on a file that lacks some classes.
        """
        super().instantiate_classes()
        self._check_against_checkpoint()
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        classes = getattr(self.datamodule, "classes", None)
        args = cfg.data.get("init_args")
        if classes is not None and args is not None and "classes" in args and not args.classes:
            args.classes = list(classes)

    def _check_against_checkpoint(self) -> None:
        """Refuse a checkpoint whose modalities, input shapes or class count are not the data's.

        Runs after the model is built from the data and before any weight is loaded.
        """
        hparams, path, model = self._checkpoint_hparams, self._checkpoint_path, self.model
        if not hparams or not isinstance(model, MultimodalModule):
            return
        where = f"--ckpt_path {path}"
        data = f"the data ({type(self.datamodule).__name__})"
        shapes = hparams.get("input_shapes")
        if isinstance(shapes, Mapping):
            try:
                check_modalities(model.modalities, list(shapes), data, "the checkpoint's model")
            except MMLearnError as exc:
                raise MMLearnError(f"{where}: {exc}") from None
            theirs = {m: [int(s) for s in shape] for m, shape in shapes.items()}
            differ = [m for m in model.modalities if theirs[m] != model.input_shapes[m]]
            if differ:
                raise MMLearnError(
                    f"{where}: input shapes differ: the checkpoint's model was built for "
                    f"{ {m: theirs[m] for m in differ} }, {data} has "
                    f"{ {m: model.input_shapes[m] for m in differ} }"
                )
        k = hparams.get("num_classes")
        if k is not None and int(k) != model.num_classes:
            raise MMLearnError(
                f"{where}: the checkpoint's model has {int(k)} classes, {data} has "
                f"{model.num_classes}"
            )
        multilabel = hparams.get("multilabel")
        if multilabel is not None and bool(multilabel) != model.multilabel:
            kind = {True: "multi-label", False: "single-label"}
            raise MMLearnError(
                f"{where}: the checkpoint's model is {kind[bool(multilabel)]}, {data} is "
                f"{kind[model.multilabel]}"
            )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Lightning's Trainer, with a progress bar without ``v_num`` and a summary without FLOPs.

        Only where the config asks for neither its own nor none (``enable_progress_bar=false``,
        ``enable_model_summary=false``, a ``ProgressBar``/``ModelSummary`` in the callbacks).
        """
        given = config.get("callbacks") or []
        present = [*callbacks, *(given if isinstance(given, list) else [given])]
        extra: list[Callback] = []
        if not config.get("barebones"):
            if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in present
            ):
                extra.append(RichBar() if _RICH_AVAILABLE else TQDMBar())
            if config.get("enable_model_summary") is not False and not any(
                isinstance(c, ModelSummary) for c in present
            ):
                extra.append(Summary())
                config["enable_model_summary"] = False  # Lightning's default one stays out
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def before_fit(self) -> None:
        """Refuse a fit that would mix into or overwrite the run already in its folder."""
        if getattr(self.trainer, "fast_dev_run", False):  # writes nothing
            return
        cfg = self.config["fit"]
        ours = yaml.safe_load(self._parser("fit").dump(cfg, skip_none=False))
        callback = self.trainer.checkpoint_callback
        dirpath = callback.dirpath if isinstance(callback, ModelCheckpoint) else None
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        ckpt = cfg.get("ckpt_path")
        # resuming this run: from one of its own checkpoints (a Slurm requeue's included), or
        # from what Lightning finds in it ("last", "hpc"); a checkpoint of another run is not
        run = find_run(ckpt)
        resuming = bool(ckpt) and (
            str(ckpt) in ("last", "hpc")
            or (run is not None and os.path.realpath(run) == os.path.realpath(folder))
        )
        check_run_folder(folder, ours, resuming=resuming, dirpath=dirpath)

    def after_validate(self) -> None:
        _say_where(self.trainer, "val")

    def after_test(self) -> None:
        _say_where(self.trainer, "test")

    def after_fit(self) -> None:
        """``--test_after_fit`` (the best checkpoint, same run and loggers), then one closing line
        on stdout: the best monitored score, its checkpoint and the run folder (rank 0)."""
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")
        # on every rank: trainer.log_dir is a broadcast under DDP (rank 0 alone would hang)
        line = closing_line(self.trainer)
        if (
            self.trainer.is_global_zero
            and not getattr(self.trainer, "fast_dev_run", False)
            # an info line: silenced with Lightning's own (mmlearn compare prints its own lines)
            and logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
        ):
            print(line, flush=True)


def _say_where(trainer: Trainer, stage: str) -> None:
    """After ``validate``/``test``: one line naming the run folder its metrics went to."""
    folder = trainer.log_dir  # a broadcast under DDP: on every rank
    quiet = not logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
    if trainer.is_global_zero and folder and not quiet:
        print(f"mmlearn: {stage} metrics in {shown(Path(folder) / 'metrics.csv')}", flush=True)


def closing_line(trainer: Trainer) -> str:
    """``mmlearn: best val/acc 0.9531 (checkpoints/best-epoch=7.ckpt); run folder runs/...``."""
    run = Path(trainer.log_dir or trainer.default_root_dir)
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint):
        return f"mmlearn: run folder {run}"
    best, score = callback.best_model_path, callback.best_model_score
    if best and score is not None and callback.monitor:
        return (
            f"mmlearn: best {callback.monitor} {float(score):.4f} in {shown(best)}; "
            f"run folder {shown(run)}"
        )
    last = shown(callback.last_model_path) if callback.last_model_path else "none"
    return (
        f"mmlearn: no best checkpoint (no {callback.monitor}); last checkpoint {last}; "
        f"run folder {shown(run)}"
    )


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


def with_run_config(args: Sequence[str]) -> list[str]:
    """``mmlearn <subcommand> --ckpt_path RUN/checkpoints/X.ckpt`` reads ``RUN/config.yaml``.

    A checkpoint of a run folder (:func:`~mmlearn.run_folder.find_run`) brings its run's config
    when no ``--config`` is given, and its folder as ``--run_dir`` when none is given: ``mmlearn
    fit --ckpt_path RUN/checkpoints/last.ckpt`` resumes the run in place and ``mmlearn test
    --ckpt_path RUN/checkpoints/best-epoch=7.ckpt`` tests it into the run.
    """
    args = list(args)
    if not args or args[0].startswith("-"):
        return args
    ckpt: str | None = None
    config = run_dir = False
    for i, arg in enumerate(args):
        config = config or arg in ("--config", "-c") or arg.startswith("--config=")
        run_dir = run_dir or arg == "--run_dir" or arg.startswith("--run_dir=")
        if arg == "--ckpt_path" and i + 1 < len(args):
            ckpt = args[i + 1]
        elif arg.startswith("--ckpt_path="):
            ckpt = arg.partition("=")[2]
    special = ckpt in (None, "last", "best", "hpc", "registry") or "://" in str(ckpt)
    if ckpt is not None and not special and not config and not Path(ckpt).is_file():
        # without a config, jsonargparse would only say that model and data are missing
        raise MMLearnError(f"--ckpt_path {ckpt}: no such file")
    run = find_run(ckpt)
    if run is None:
        return args
    # the run's folder is where the checkpoint is now (a run_dir in a config may be stale: the
    # folder moved); a --run_dir given on the command line is checked against it
    head = [args[0]] if config else [args[0], "--config", str(run / RUN_CONFIG)]
    return head + args[1:] + ([] if run_dir else [f"--run_dir={run}"])


def build_cli(
    args: Sequence[str] | None = None, run: bool = True, cli_class: type[MMLearnCLI] = MMLearnCLI
) -> MMLearnCLI:
    """Construct (and by default run) the CLI on ``args`` (``--config`` files read first; a
    checkpoint of a run folder brings its ``config.yaml``, :func:`with_run_config`).
    ``cli_class``: a subclass that runs a subcommand its own way (``mmlearn evaluate``)."""
    quiet_lightning()
    return cli_class(
        MultimodalModule,
        MultimodalDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=ConfigSaver,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs=dict(parser_mode="omegaconf", description=DESCRIPTION, exit_on_error=False),
        args=with_run_config(configs_first(sys.argv[1:] if args is None else args)),
        run=run,
    )
