"""Write ``mmlearn predict`` output to a CSV in the run directory.

One row per sample: target, prediction (class names where the data has them; multi-label: the
labels joined by ``|``) and one probability per class.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """After ``predict``, write ``predictions.csv``: sample, target, pred and ``p_<class>``.

    Args:
        filename: file name inside the run directory (``trainer.log_dir``), or an absolute path.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.path: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        if not predictions:
            return
        name = Path(self.filename)
        if trainer.world_size > 1:
            # each rank writes its own rows; merging would need a gather of every prediction
            name = name.with_name(f"{name.stem}.rank{trainer.global_rank}{name.suffix}")
        log_probs = torch.cat([p["log_probs"] for p in predictions]).float()
        target = torch.cat([p["target"] for p in predictions])
        pred = torch.cat([p["pred"] for p in predictions])
        probs = log_probs.exp().tolist()
        path = Path(trainer.log_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # class names, where the data has them (a table's string labels)
        names = getattr(getattr(trainer, "datamodule", None), "classes", None)
        names = names or list(range(len(probs[0])))

        def label(y: torch.Tensor) -> str:
            if y.ndim == 0:
                return str(names[int(y)])
            return "|".join(str(names[k]) for k in y.nonzero().flatten().tolist())  # multi-hot

        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sample", "target", "pred", *[f"p_{k}" for k in names]])
            for i, row in enumerate(probs):
                w.writerow([i, label(target[i]), label(pred[i]), *(f"{p:.6g}" for p in row)])
        self.path = path
