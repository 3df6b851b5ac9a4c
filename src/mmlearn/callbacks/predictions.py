"""Write ``mmlearn predict`` output to a CSV in the run directory.

One row per sample: its id (the DataModule's :meth:`~mmlearn.data.base.MultimodalDataModule.
predict_ids`: a table's id column or row number, else the index in the split), the prediction
(class names where the data has them; multi-label: the labels joined by ``|``), one probability
per class, and the target (empty where the label is unknown).
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
    """After ``predict``, write ``predictions.csv``: id, pred, ``p_<class>`` and target.

    Args:
        filename: file name inside the run directory (``trainer.log_dir``), or an absolute path.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.path: Path | None = None

    def output_path(self, trainer: pl.Trainer) -> Path:
        """Where this process writes: ``filename`` in the run folder; one file per DDP rank."""
        name = Path(self.filename)
        if trainer.world_size > 1:
            # each rank writes its own rows; merging would need a gather of every prediction
            name = name.with_name(f"{name.stem}.rank{trainer.global_rank}{name.suffix}")
        return Path(trainer.log_dir or ".") / name

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        if not predictions:
            return
        log_probs = torch.cat([p["log_probs"] for p in predictions]).float()
        target = torch.cat([p["target"] for p in predictions])
        pred = torch.cat([p["pred"] for p in predictions])
        probs = log_probs.exp().tolist()
        datamodule = getattr(trainer, "datamodule", None)
        ids = sample_ids(datamodule, batch_indices, len(probs))
        path = self.output_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        # class names, where the data has them (a table's string labels)
        names = getattr(datamodule, "classes", None) or list(range(len(probs[0])))

        def label(y: torch.Tensor) -> str:
            if bool((y < 0).any()):
                return ""  # unknown (UNKNOWN = -1: a file to label)
            if y.ndim == 0:
                return str(names[int(y)])
            return "|".join(str(names[k]) for k in y.nonzero().flatten().tolist())  # multi-hot

        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "pred", *[f"p_{k}" for k in names], "target"])
            for i, row in enumerate(probs):
                w.writerow([ids[i], label(pred[i]), *(f"{p:.6g}" for p in row), label(target[i])])
        self.path = path
        if getattr(trainer, "global_rank", 0) == 0:
            world = getattr(trainer, "world_size", 1)
            others = f" (rank 0 of {world}; each rank writes its own file)" if world > 1 else ""
            print(f"predictions: {len(probs)} rows written to {path}{others}", flush=True)


def sample_ids(datamodule: Any, batch_indices: Sequence[Any], n: int) -> list[str]:
    """The id of each of the ``n`` predicted samples, in the order they were predicted.

    ``batch_indices`` (Lightning's, per dataloader and batch) are the samples' positions in the
    predict data (under DDP, this rank's share of it); the DataModule's ``predict_ids`` names each
    position. Without either: the position itself.
    """
    positions = _flatten(batch_indices)
    if len(positions) != n:
        positions = list(range(n))
    predict_ids = getattr(datamodule, "predict_ids", None)
    if not callable(predict_ids):
        return [str(i) for i in positions]
    names = list(predict_ids())
    if positions and max(positions) >= len(names):
        return [str(i) for i in positions]
    return [str(names[i]) for i in positions]


def _flatten(indices: Any) -> list[int]:
    if isinstance(indices, int):
        return [indices]
    if isinstance(indices, torch.Tensor):
        return [int(i) for i in indices.flatten().tolist()]
    out: list[int] = []
    for item in indices or []:
        out += _flatten(item)
    return out
