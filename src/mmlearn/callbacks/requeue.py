"""Slurm preemption: checkpoint at a batch boundary, requeue, resume exactly where it stopped."""

from __future__ import annotations

import signal
import subprocess
import time
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mmlearn.loggers import slurm_run_id


class SlurmRequeue(Callback):
    """On Slurm's warning signal, save ``hpc_ckpt_N.ckpt`` after the current batch and requeue.

    ``#SBATCH --signal=SIGUSR1@90`` (or ``scancel -s USR1``, or a preempting scheduler) sends the
    signal. Lightning's own handler saves *inside* the signal handler, at whatever point the
    signal interrupts (between an optimiser step and its bookkeeping, say), and the resumed run
    can differ from an uninterrupted one. Here the handler only raises a flag. At the end of the
    current training batch every rank agrees (one all-reduce of a bool), all save the checkpoint
    together into ``default_root_dir`` (where Lightning looks for ``hpc_ckpt_*`` on start), rank 0
    runs ``scontrol requeue`` and the job waits to be stopped. The requeued job keeps its id, finds
    the same run folder (``--run_dir``) and resumes from that batch: the training loader is
    resumable, so it ends with the weights of an uninterrupted run.

    Installed before Lightning's handler, which then stays out of the way. Does nothing outside
    Slurm or when the environment's ``auto_requeue`` is off. A SIGTERM that comes without the
    requeue signal (``scancel``, a preemption without warning) is the checkpoint callback's:
    :class:`~mmlearn.callbacks.Checkpoint` saves ``last.ckpt`` and the job exits with 143; a
    requeued job resumes from the newer of that and the hpc checkpoint
    (:func:`~mmlearn.run_folder.requeue_checkpoint`).

    Args:
        wait_s: how long to wait for Slurm to stop the job after the requeue before training on.
    """

    def __init__(self, wait_s: float = 300.0) -> None:
        self.wait_s = wait_s
        self._signal: signal.Signals | None = None
        self._previous: Any = None
        self._requested = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        self._signal = env.requeue_signal or signal.SIGUSR1
        self._previous = signal.signal(self._signal, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._signal is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        self._requested = False
        # the name Lightning's start-up looks for (hpc_ckpt_<max + 1>.ckpt)
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        for logger in trainer.loggers:
            logger.save()
        ok = True
        if trainer.is_global_zero:
            job = slurm_run_id()
            ok = job is not None and subprocess.call(["scontrol", "requeue", job]) == 0
            rank_zero_info(f"saved {path} at step {trainer.global_step}; requeue {job}: {ok}")
        if not trainer.strategy.broadcast(ok):
            rank_zero_warn("scontrol requeue failed: training goes on in this job")
            return
        # Slurm stops the job (SIGTERM) once it is requeued: that SIGTERM ends this job with
        # status 0 (the run goes on in the requeued one), whoever handles SIGTERM otherwise
        stopped: list[int] = []
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
        try:
            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline:
                if stopped or trainer.received_sigterm:
                    raise SystemExit(0)
                time.sleep(0.2)
        finally:
            signal.signal(signal.SIGTERM, previous)
        rank_zero_warn(f"still running {self.wait_s:.0f} s after the requeue: training goes on")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._signal is not None:
            signal.signal(self._signal, self._previous)
            self._signal = None
