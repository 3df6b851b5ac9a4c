"""A ``ModelCheckpoint`` whose ``last.ckpt`` really is the latest state."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that rewrites ``last.ckpt`` at every save point, improved or not.

    Lightning 2.6 writes ``last.ckpt`` only at steps where it also writes a top-k checkpoint, so
    after an epoch that did not improve the monitored metric ``last.ckpt`` silently stays at an
    older epoch: resuming from it repeats epochs, and reading final weights from it reads the
    wrong ones. Here every validation end (or train-epoch end, when that is the save point) also
    refreshes ``last.ckpt``. All options are Lightning's.
    """

    _last_written_step = -1

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
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)
