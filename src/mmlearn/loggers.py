"""Loggers: a CSV logger that never deletes what an earlier run wrote, and a W&B logger.

Lightning's CSV writer removes an existing ``metrics.csv`` when its version folder is reused (a
resumed or requeued run, or a mistyped ``version``). Ours appends to it instead: earlier rows stay,
and the header grows when new keys appear. A resumed run first drops the rows an interrupted run
logged after its checkpoint (:meth:`CSVLogger.drop_rows_from`), so the file holds one history with
every step once. The W&B logger goes offline by itself when there is no account and continues the
same W&B run when Slurm requeues a job.
"""

from __future__ import annotations

import csv
import netrc
import os
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from mmlearn.run_folder import DEFAULT_ROOT


class AppendingWriter(ExperimentWriter):
    """Experiment writer that keeps an existing ``metrics.csv`` and appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose metrics file survives a reused run folder.

    Args:
        save_dir: parent of the run folder; ``None`` (default): ``trainer.default_root_dir``,
            filled in by the CLI (``runs`` when the logger is built by hand).
        name, version, prefix, flush_logs_every_n_steps: as in Lightning's ``CSVLogger``.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(
            save_dir or DEFAULT_ROOT,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]

    @rank_zero_only
    def drop_rows_from(self, step: int) -> None:
        """Forget every training or validation row of ``metrics.csv`` logged at ``step`` or later.

        A run resumed from a checkpoint logs those steps again: the rows its interrupted
        predecessor wrote after the checkpoint (before it was stopped) would be listed twice, and
        with other values. ``step=0`` empties the history (a run that starts over). Test rows
        (``--test_after_fit``) stay: each is the evaluation of a checkpoint that still exists.

        Args:
            step: the first step the resumed run logs (the checkpoint's ``next log step``).
        """

        def kept(row: Mapping[str, object]) -> bool:
            metrics = [
                k for k, v in row.items() if k not in ("epoch", "step") and v not in ("", None)
            ]
            if metrics and all(k.startswith("test/") for k in metrics):
                return True
            return row.get("step") in ("", None) or int(float(str(row["step"]))) < step

        writer = self.experiment
        writer.metrics = [m for m in writer.metrics if kept(m)]
        path = writer.metrics_file_path
        if not self._fs.isfile(path):
            return
        with self._fs.open(path, "r", newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)
        kept_rows = [r for r in rows if kept(r)]
        if len(kept_rows) == len(rows):
            return
        with self._fs.open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=fields)
            out.writeheader()
            out.writerows(kept_rows)


def wandb_credentials() -> bool:
    """Whether W&B could log in without asking: ``WANDB_API_KEY`` or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def slurm_run_id() -> str | None:
    """The Slurm job id (``<array job>_<task>`` in an array), stable across requeues; else None."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` with the defaults a shared cluster needs.

    * ``offline=None`` (default) decides by itself: offline when ``WANDB_MODE`` says so or when no
      API key is configured (no ``WANDB_API_KEY``, no netrc entry). Offline runs are written under
      ``save_dir/wandb/offline-run-*``; ``wandb sync <that folder>`` uploads them later.
    * ``id=None`` inside a Slurm job uses the job id, so a requeued job continues its W&B run.
    * ``group``/``job_type``/``tags`` are real options (Lightning passes them through ``**kwargs``,
      which the CLI cannot see). ``mmlearn`` fills ``group`` with ``<Data>/<Strategy>`` when unset.

    Args:
        project: W&B project (``$WANDB_PROJECT`` when set, else ``mmlearn``).
        save_dir: parent folder of the local ``wandb/`` run files; ``None`` (default):
            ``trainer.default_root_dir``, filled in by the CLI (``runs`` when built by hand).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | None = None,
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        id: str | None = None,
        offline: bool | None = None,
        log_model: bool | Literal["all"] = False,
        prefix: str = "",
    ) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE")
            offline = mode in ("offline", "dryrun") if mode else not wandb_credentials()
        save_dir = save_dir or DEFAULT_ROOT
        os.makedirs(save_dir, exist_ok=True)  # wandb falls back to a temp dir when it is missing
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project or os.environ.get("WANDB_PROJECT", "mmlearn"),
            id=id or slurm_run_id(),
            offline=offline,
            log_model=log_model,
            prefix=prefix,
            entity=entity,
            group=group,
            job_type=job_type,
            tags=tags,
            notes=notes,
        )
