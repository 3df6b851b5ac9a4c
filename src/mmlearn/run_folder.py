"""Where a run's files go: ``<default_root_dir>/<Data>/<Strategy>/version_N``, or ``--run_dir``.

Lightning's convention decides the root: ``--trainer.default_root_dir`` (``runs`` by default).
Every logger whose ``save_dir`` is left unset writes under it; a ``save_dir`` given explicitly
still wins, as it does in Lightning. The CSV logger, first in the list, names the run folder
(``config.yaml``, ``checkpoints/``, ``metrics.csv``); W&B gets the group ``<Data>/<Strategy>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from jsonargparse import Namespace

#: the root when neither ``--trainer.default_root_dir`` nor ``--run_dir`` is given
DEFAULT_ROOT = "runs"
#: the epoch budget of a run that sets no bound at all (Lightning's own default is 1000 epochs)
DEFAULT_MAX_EPOCHS = 100


def loggers(cfg: Namespace) -> Iterator[Namespace]:
    """The logger entries of a parsed config (one, a list, or none) that have ``init_args``."""
    logger = cfg.get("trainer", {}).get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, Namespace) and entry.get("init_args") is not None:
            yield entry


def _short(class_path: object) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def bound_training(cfg: Namespace) -> None:
    """Give ``trainer.max_epochs`` a finite default when nothing else bounds the run.

    Lightning trains for 1000 epochs when neither ``max_epochs`` nor ``max_steps`` nor
    ``max_time`` is set; a run that sets any of them keeps exactly what it set.
    """
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    unbounded_steps = trainer.get("max_steps") in (None, -1)
    if trainer.get("max_epochs") is None and unbounded_steps and trainer.get("max_time") is None:
        trainer.max_epochs = DEFAULT_MAX_EPOCHS


def place_run(cfg: Namespace, subcommand: str | None) -> dict[str, Any] | None:
    """Point the loggers, checkpoints and ``default_root_dir`` of ``cfg`` at the run's folder.

    Without ``run_dir``: every logger with no ``save_dir`` writes under
    ``trainer.default_root_dir``, the CSV run is named ``<Data>/<Strategy>`` (so the folder is
    ``<root>/<Data>/<Strategy>/version_N``). With ``run_dir``: every logger, the checkpoints and
    ``default_root_dir`` (where Slurm's ``hpc_ckpt_*.ckpt`` go and are found again) are that one
    folder, which a requeued or resumed job passes again.

    Args:
        cfg: the parsed config of the subcommand (changed in place).
        subcommand: ``fit``, ``validate``, ``test``, ``predict`` (``None`` without subcommands).

    Returns:
        ``save_config_kwargs`` for the config callback when the run's config must be written
        under another name (a ``test`` into the ``run_dir`` of its ``fit``), else ``None``.
    """
    model, data = _short(cfg.model.class_path), _short(cfg.data.class_path)
    run_dir = cfg.get("run_dir")
    trainer = cfg.trainer
    if run_dir is not None:
        trainer.default_root_dir = run_dir
    root = trainer.get("default_root_dir") or DEFAULT_ROOT
    trainer.default_root_dir = root
    for logger in loggers(cfg):
        kind, args = _short(logger.class_path), logger.init_args
        if kind.endswith("WandbLogger"):
            args.group = args.get("group") or f"{data}/{model}"
            args.job_type = args.get("job_type") or subcommand
            args.tags = args.get("tags") or [data, model]
            if args.get("name") in (None, "lightning_logs"):
                args.name = f"{model}-seed{cfg.get('seed_everything')}"
        if run_dir is not None and "save_dir" in args:
            args.save_dir = run_dir
            if kind.endswith(("CSVLogger", "TensorBoardLogger")):
                args.name, args.version = "", ""
            continue
        if "save_dir" in args and args.get("save_dir") is None:
            args.save_dir = root
        if kind.endswith("CSVLogger") and args.get("name") in (None, "lightning_logs"):
            args.name = f"{data}/{model}"
    if run_dir is None:
        return None
    if cfg.get("checkpoint") is not None and cfg.checkpoint.get("dirpath") is None:
        cfg.checkpoint.dirpath = os.path.join(run_dir, "checkpoints")
    if subcommand not in (None, "fit"):  # keep the training config; record this one beside it
        return {"config_filename": f"{subcommand}-config.yaml", "overwrite": True}
    return None
