"""A ``ModelCheckpoint`` whose ``last.ckpt`` really is the latest state, also when stopped."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch import Tensor

from mmlearn.loggers import CSVLogger
from mmlearn.run_folder import resume_command, shown

#: the signals that stop a fit with a resumable ``last.ckpt``
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: where a checkpoint records the first ``metrics.csv`` step that is not yet part of its history
NEXT_LOG_STEP = "mmlearn_next_log_step"


def next_log_step(trainer: pl.Trainer) -> int:
    """The step at which the next metrics row of this fit will be logged, were it to go on.

    Lightning logs a training batch at the count of batches that stepped before it, and that
    count grows after the batch's ``on_train_batch_end`` and after a validation at its end. So a
    checkpoint saved inside a batch (or a validation) has logged that step already; one saved
    at the end of an epoch has not logged the step it stands at.
    """
    loop = trainer.fit_loop.epoch_loop
    step = loop._batches_that_stepped
    progress = loop.batch_progress.total
    if getattr(progress, "processed", progress.completed) > progress.completed:  # in the batch
        return step if loop._should_accumulate() else step + 1
    return step + 1 if trainer.validating else step


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state: after every epoch, on resume
    and when the fit is stopped by SIGTERM or SIGINT.

    * Lightning 2.6 writes ``last.ckpt`` only at steps where it also writes a top-k checkpoint, so
      after an epoch that did not improve the monitored metric ``last.ckpt`` silently stays at an
      older epoch. Here every validation end (or train-epoch end, when that is the save point)
      also refreshes ``last.ckpt``.
    * Resumed in its own folder (the run folder moved, or named another way), it restores the
      best score and the best checkpoints (Lightning compares the folder names as strings), so
      "best" is the best of the whole run. The CSV logger drops the rows the interrupted run
      logged after the checkpoint; a fit that starts from nothing in a folder with an old
      ``metrics.csv`` (of an attempt that saved no checkpoint) starts it afresh.
    * SIGTERM (a scheduler, ``kill``) or SIGINT (Ctrl+C) during the fit: at the end of the current
      training batch every rank agrees, ``last.ckpt`` is saved, and the process exits with
      ``128 + signal`` (143, 130) before anything else is trained or logged, printing the command
      that resumes the run. A second Ctrl+C interrupts at once (Lightning's handling, exit 1).

    All options are Lightning's.
    """

    # the state of one fit, reset in setup (no __init__ of its own: the CLI reads Lightning's)
    _last_written_step = -1
    _signal: signal.Signals | None = None
    _stop_code: int | None = None
    _saved: str | None = None
    _resumed_from: str | None = None
    _handlers: dict[signal.Signals, Any] | None = None

    @property
    def stopping(self) -> signal.Signals | None:
        """The stop signal this process received during the fit, if any."""
        return self._signal

    # ---- last.ckpt at every save point ---------------------------------------------------
    def _save_last_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]
    ) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if (
            self.save_last
            and self._last_written_step != trainer.global_step
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    # ---- one history: resume in place ----------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._signal, self._stop_code, self._saved = None, None, None
        self._resumed_from, self._handlers = None, None
        with warnings.catch_warnings():
            # a resumed run's own folder; the CLI refuses to train a new run into a used one
            warnings.filterwarnings("ignore", ".*exists and is not empty.*")
            super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[NEXT_LOG_STEP] = next_log_step(trainer)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None
        if trainer.state.fn != "fit":
            return
        # a checkpoint of another version: the epoch-end rule (its step is not logged yet)
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        fallback = loops.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", 0)
        step = int(checkpoint.get(NEXT_LOG_STEP, fallback))
        if not self._in_this_run(self._resumed_from):
            step = 0  # another run's checkpoint: none of this folder's rows are its history
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.drop_rows_from(step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a run that starts from nothing has no history yet
            for logger in trainer.loggers:
                if isinstance(logger, CSVLogger):
                    logger.drop_rows_from(0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and stored != self.dirpath and self._same_folder(stored):
            state_dict = self._moved(state_dict, str(stored), str(self.dirpath))
        super().load_state_dict(state_dict)

    def _in_this_run(self, ckpt_path: str | None) -> bool:
        """Whether ``ckpt_path`` lies in this run: its checkpoint folder or the folder above."""
        if not ckpt_path or not self.dirpath:
            return False
        here = os.path.realpath(str(self.dirpath))
        return os.path.realpath(os.path.dirname(ckpt_path)) in (here, os.path.dirname(here))

    def _same_folder(self, stored: str) -> bool:
        """Whether ``stored`` (a checkpoint's ``dirpath``) is this callback's folder.

        Either both name the same folder, or the checkpoint being resumed lies in this folder
        (the run folder moved, or its checkpoint folder was named relative to another directory).
        """
        if os.path.realpath(stored) == os.path.realpath(str(self.dirpath)):
            return True
        return self._in_this_run(self._resumed_from)

    @staticmethod
    def _moved(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
        def move(path: Any) -> Any:
            if isinstance(path, str) and path and os.path.dirname(path) == old.rstrip(os.sep):
                return os.path.join(new, os.path.basename(path))
            return path

        state = dict(state, dirpath=new)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = move(state[key])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
        return state

    # ---- SIGTERM / SIGINT: save last.ckpt at a batch boundary, exit 128 + signal -----------
    def _install_handlers(self, trainer: pl.Trainer) -> None:
        """Take over SIGTERM and SIGINT from Lightning (installed after its own handlers).

        Lightning's SIGTERM handler would stop the fit anywhere (inside a validation, with
        nothing saved) with exit status 0; Python's SIGINT raises wherever the program is.
        """
        if self._handlers or threading.current_thread() is not threading.main_thread():
            return
        self._handlers = {}
        launcher = trainer.strategy.launcher

        def handler(signum: int, frame: FrameType | None) -> None:
            sig = signal.Signals(signum)
            if sig == signal.SIGINT and self._signal is not None:
                raise KeyboardInterrupt  # the second Ctrl+C: stop now
            if self._signal is None and isinstance(launcher, _SubprocessScriptLauncher):
                launcher.kill(signum)  # the ranks this process started stop with it
            self._signal = self._signal or sig

        for sig in STOP_SIGNALS:
            self._handlers[sig] = signal.signal(sig, handler)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handlers(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_handlers(trainer)
        if trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False):
            self._stop(trainer, None)  # stopped before the first batch: nothing new to save

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer, *args)
        if self._stop_code is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False):
            return
        self._signal = self._signal or signal.SIGTERM  # another rank was signalled
        if self.save_last:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            saved = self.last_model_path
        else:
            saved = os.path.join(str(self.dirpath), self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(saved)
        self._stop_code = 128 + int(self._signal)
        self._saved = saved
        # the batch's metrics are logged after this hook: stop at the next one

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_saved(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)
        if self._signal is not None:  # signalled during the last validation: the run is done
            self._stop(trainer, self.last_model_path or None)

    def _stop_if_saved(self, trainer: pl.Trainer) -> None:
        if self._stop_code is not None:
            self._stop(trainer, self._saved)

    def _stop(self, trainer: pl.Trainer, saved: str | None) -> None:
        sig = self._signal or signal.SIGTERM
        if trainer.is_global_zero:
            where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
            if saved:
                print(
                    f"mmlearn: stopped by {sig.name} at {where}; saved {shown(saved)}. "
                    f"Resume with: {resume_command(saved)}",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(f"mmlearn: stopped by {sig.name} at {where}", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(sig))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning's own teardown has put back the handlers from before the fit
        self._handlers = None
