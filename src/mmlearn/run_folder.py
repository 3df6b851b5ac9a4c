"""What a run is and where its files go: one folder with one history.

A run folder holds ``config.yaml``, ``checkpoints/`` and ``metrics.csv`` (and Slurm's
``hpc_ckpt_*.ckpt``, W&B's files). It is ``<default_root_dir>/<Data>/<Strategy>/version_N`` or
exactly ``--run_dir``. Lightning's convention decides the root: ``--trainer.default_root_dir``
(``runs`` by default). Every logger whose ``save_dir`` is left unset writes under it; a ``save_dir``
given explicitly still wins, as it does in Lightning. The CSV logger, first in the list, names the
run folder; W&B gets the group ``<Data>/<Strategy>``.

A checkpoint belongs to the run folder above it (the nearest folder, the checkpoint's own or its
parent, that holds ``config.yaml`` and ``checkpoints/``). ``fit --ckpt_path`` with such a
checkpoint continues that run in place; ``validate``/``test``/``predict`` write into it
(``RUN/<subcommand>/metrics.csv`` and ``RUN/<subcommand>-config.yaml``; ``predict`` writes
``RUN/predictions.csv``). ``fit`` into a folder that already holds checkpoints, without
``--ckpt_path``, is refused, except for a Slurm requeue of that run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from mmlearn.errors import MMLearnError

#: the root when neither ``--trainer.default_root_dir`` nor ``--run_dir`` is given
DEFAULT_ROOT = "runs"
#: the epoch budget of a run that sets no bound at all (Lightning's own default is 1000 epochs)
DEFAULT_MAX_EPOCHS = 100
#: the file and the folder that make a folder a run folder
RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
#: the values of ``ckpt_path`` that Lightning resolves itself
SPECIAL_CKPT_PATHS = frozenset({"best", "last", "hpc", "registry"})

#: config keys that say where a run's files go, not what the run is (compared to nothing)
_PLACEMENT = re.compile(
    r"^(ckpt_path|run_dir|trainer\.default_root_dir|checkpoint\.dirpath"
    r"|trainer\.logger(\.\d+)?\.init_args\.(save_dir|name|version))$"
)
#: config keys a run may change when it comes back (resumed with a longer budget, say)
RESUMABLE = frozenset(
    {
        "trainer.max_epochs",
        "trainer.max_steps",
        "trainer.max_time",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
        "test_after_fit",
    }
)


class RunFolderError(MMLearnError, RuntimeError):
    """A command that would overwrite an existing run or mix another run into its folder.

    A user error (printed as one ``mmlearn: error:`` line); also a ``RuntimeError``, the type
    Lightning's own config callback raises for an existing ``config.yaml``.
    """


def loggers(cfg: Namespace) -> Iterator[Namespace]:
    """The logger entries of a parsed config (one, a list, or none) that have ``init_args``."""
    logger = cfg.get("trainer", {}).get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, Namespace) and entry.get("init_args") is not None:
            yield entry


def _short(class_path: object) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def _is_file_path(ckpt_path: object) -> bool:
    """Whether ``ckpt_path`` names a local file (not ``best``/``last``/``hpc`` or a URL)."""
    return (
        isinstance(ckpt_path, (str, os.PathLike))
        and str(ckpt_path) not in SPECIAL_CKPT_PATHS
        and "://" not in str(ckpt_path)
    )


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a run: a ``config.yaml`` beside a ``checkpoints/`` folder."""
    return (folder / RUN_CONFIG).is_file() and (folder / CHECKPOINTS).is_dir()


def find_run(ckpt_path: object) -> Path | None:
    """The run folder a checkpoint file belongs to, or ``None`` for a checkpoint of no run.

    That is the checkpoint's own folder (``RUN/hpc_ckpt_1.ckpt``) or its parent
    (``RUN/checkpoints/last.ckpt``), whichever first holds ``config.yaml`` and ``checkpoints/``.
    """
    if not _is_file_path(ckpt_path) or not Path(str(ckpt_path)).is_file():
        return None
    path = Path(str(ckpt_path))
    for folder in (path.parent, path.parent.parent):
        if is_run_folder(folder):
            return folder
    return None


def saved_checkpoints(run: Path, dirpath: str | os.PathLike[str] | None = None) -> list[Path]:
    """The checkpoints a run folder holds: ``checkpoints/*.ckpt`` and Slurm's ``hpc_ckpt_*``."""
    folder = Path(dirpath) if dirpath is not None else run / CHECKPOINTS
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    return found + sorted(run.glob("hpc_ckpt_*.ckpt"))


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` as a message shows it: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else os.path.abspath(path)


def resume_command(ckpt: str | os.PathLike[str]) -> str:
    """The command that resumes the run of checkpoint ``ckpt`` in place."""
    if find_run(ckpt) is not None:
        return f"mmlearn fit --ckpt_path {shown(ckpt)}"
    return f"mmlearn fit --config <its config> --ckpt_path {shown(ckpt)}"


def requeue_checkpoint(run: Path) -> Path | None:
    """The checkpoint a Slurm requeue of ``run`` resumes from, or ``None`` when it is not one.

    Lightning resumes a Slurm job from the newest ``hpc_ckpt_N.ckpt`` in the run folder (written
    on the requeue signal). A job requeued without one (a node failure; a preemption that sent
    SIGTERM, on which ``checkpoints/last.ckpt`` was saved) has ``SLURM_RESTART_COUNT`` >= 1 and
    resumes from ``last.ckpt``. Of the two, the newer is taken.
    """
    if not SLURMEnvironment.detect():
        return None
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    last = run / CHECKPOINTS / "last.ckpt"
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) >= 1
    candidates = hpc[-1:] + ([last] if last.is_file() and (hpc or requeued) else [])
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config (lists of mappings, such as loggers, by index)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        out = {}
        for i, v in enumerate(value):
            out |= _flatten(v, f"{prefix}.{i}")
        return out
    return {prefix: value}


def config_differences(
    theirs: Mapping[str, Any], ours: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(key, their value, our value)`` for every key two run configs set differently.

    Keys that only say where the files go (``run_dir``, ``ckpt_path``, the loggers' ``save_dir``,
    ``name`` and ``version``, ``default_root_dir``, the checkpoint ``dirpath``) are not compared.
    """
    a, b = _flatten(theirs), _flatten(ours)
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if not _PLACEMENT.match(k) and a.get(k) != b.get(k)
    ]


def describe_differences(differences: list[tuple[str, Any, Any]], limit: int = 3) -> str:
    """``key (x there, y here)`` for the first ``limit`` differences, and how many more."""
    shown = [f"{k} ({a!r} there, {b!r} here)" for k, a, b in differences[:limit]]
    more = len(differences) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def another_run(
    folder: Path, theirs: Mapping[str, Any], ours: Mapping[str, Any], name: str = RUN_CONFIG
) -> RunFolderError | None:
    """The error for a folder whose config ``theirs`` is another run's than ``ours``, or None.

    Keys that only say where files go, and the budget a resumed run may change
    (:data:`RESUMABLE`), do not make it another run.
    """
    differences = [d for d in config_differences(theirs, ours) if d[0] not in RESUMABLE]
    if not differences:
        return None
    return RunFolderError(
        f"{folder} holds another run: its {name} differs in "
        f"{describe_differences(differences)}; start this run in a new folder (another "
        "--run_dir, or none for the next version_N)"
    )


def check_run_folder(
    folder: Path,
    ours: Mapping[str, Any],
    resuming: bool,
    dirpath: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse a ``fit`` that would mix into or overwrite the run already in ``folder``.

    Args:
        folder: the folder this fit writes to (its ``trainer.log_dir``).
        ours: this fit's config, as it would be saved.
        resuming: whether it resumes from a checkpoint (``--ckpt_path``, a Slurm requeue).
        dirpath: the checkpoint folder, when it is not ``folder/checkpoints``.

    Raises:
        RunFolderError: ``folder`` holds another run's ``config.yaml``, or checkpoints of a run
            that this fit, resuming from nothing, would train again from scratch.
    """
    config = folder / RUN_CONFIG
    if config.is_file():
        error = another_run(folder, yaml.safe_load(config.read_text()) or {}, ours)
        if error is not None:
            raise error
    if dirpath is not None and _same_folder(dirpath, folder / CHECKPOINTS):
        dirpath = None  # spelled as the folder is
    found = saved_checkpoints(folder, dirpath)
    if found and not resuming:
        last = next((p for p in found if p.name == "last.ckpt"), found[-1])
        raise RunFolderError(
            f"{folder} already holds a trained run ({len(found)} checkpoint(s) beside its "
            f"{RUN_CONFIG}); resume it with `{resume_command(last)}`, or start a new run in a "
            "new folder (another --run_dir, or none for the next version_N)"
        )


def bound_training(cfg: Namespace, subcommand: str | None = None) -> None:
    """Check the training bounds of ``cfg``; give ``max_epochs`` a default when nothing bounds it.

    Lightning trains for 1000 epochs when neither ``max_epochs`` nor ``max_steps`` nor
    ``max_time`` is set; here that default is :data:`DEFAULT_MAX_EPOCHS`, and a run that sets any
    of them keeps exactly what it set.

    Raises:
        MMLearnError: (``fit``) ``max_epochs`` or ``max_steps`` is 0 or below -1 (a run that
            trains nothing and saves no checkpoint), or ``max_epochs`` is -1 ("no limit") with no
            step or time bound.
    """
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if subcommand in (None, "fit") and not trainer.get("fast_dev_run"):
        for key, value in (("max_epochs", max_epochs), ("max_steps", max_steps)):
            if value is not None and (value == 0 or value < -1):
                raise MMLearnError(
                    f"trainer.{key}={value}: a fit must train; expected >= 1 (or -1 for no "
                    "limit, with another bound)"
                )
        if max_epochs == -1 and max_steps in (None, -1) and trainer.get("max_time") is None:
            raise MMLearnError(
                "trainer.max_epochs=-1 (no epoch limit) with neither trainer.max_steps nor "
                "trainer.max_time: the run would never end; set one of them, or max_epochs >= 1"
            )
    if max_epochs is None and max_steps in (None, -1) and trainer.get("max_time") is None:
        trainer.max_epochs = DEFAULT_MAX_EPOCHS


def _same_folder(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def place_run(cfg: Namespace, subcommand: str | None) -> dict[str, Any] | None:
    """Point the loggers, checkpoints and ``default_root_dir`` of ``cfg`` at the run's folder.

    The run folder is ``run_dir``, else the run a ``ckpt_path`` belongs to (:func:`find_run`),
    else a new ``<root>/<Data>/<Strategy>/version_N``. Without a run folder: every logger with no
    ``save_dir`` writes under ``trainer.default_root_dir`` and the CSV run is named
    ``<Data>/<Strategy>``. With one: every logger, the checkpoints and ``default_root_dir`` (where
    Slurm's ``hpc_ckpt_*.ckpt`` go and are found again) are that folder; a ``validate``/``test``
    logs to ``RUN/<subcommand>/`` and saves its config as ``RUN/<subcommand>-config.yaml``.

    Args:
        cfg: the parsed config of the subcommand (changed in place).
        subcommand: ``fit``, ``validate``, ``test``, ``predict`` (``None`` without subcommands).

    Returns:
        ``save_config_kwargs`` for the config callback when the run's config must be written
        under another name (a ``test`` into the run of its ``fit``), else ``None``.

    Raises:
        RunFolderError: ``run_dir`` names another folder than the run of ``ckpt_path``.
    """
    model, data = _short(cfg.model.class_path), _short(cfg.data.class_path)
    run_dir = cfg.get("run_dir")
    ckpt_path = cfg.get("ckpt_path")
    run = find_run(ckpt_path)
    if run is not None:
        if run_dir is not None and not _same_folder(run_dir, run):
            raise RunFolderError(
                f"--ckpt_path {ckpt_path} belongs to the run {run}, not to --run_dir {run_dir}; "
                "leave out --run_dir: the run continues (or is evaluated) in its own folder"
            )
        run_dir = cfg.run_dir = run_dir if run_dir is not None else str(run)
    elif subcommand == "fit" and run_dir is not None and not ckpt_path:
        requeued = requeue_checkpoint(Path(run_dir))
        if requeued is not None:
            cfg.ckpt_path = str(requeued)
            rank_zero_info(f"mmlearn: Slurm requeue: {run_dir} resumes from {requeued}")
    trainer = cfg.trainer
    if run_dir is not None:
        trainer.default_root_dir = run_dir
    root = trainer.get("default_root_dir") or DEFAULT_ROOT
    trainer.default_root_dir = root
    # fit and predict write into the run folder itself; an evaluation into its own subfolder
    version = "" if subcommand in (None, "fit", "predict") else subcommand
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
                args.name, args.version = "", version
            continue
        if "save_dir" in args and args.get("save_dir") is None:
            args.save_dir = root
        if kind.endswith("CSVLogger") and args.get("name") in (None, "lightning_logs"):
            args.name = f"{data}/{model}"
    if run_dir is None:
        return None
    if cfg.get("checkpoint") is not None and cfg.checkpoint.get("dirpath") is None:
        cfg.checkpoint.dirpath = os.path.join(run_dir, CHECKPOINTS)
    if subcommand not in (None, "fit"):  # keep the training config; record this one beside it
        name = os.path.join(os.path.abspath(run_dir), f"{subcommand}-config.yaml")
        return {"config_filename": name, "overwrite": True}
    return None
