"""The DataModule base: in-memory multi-modal splits, validated once, served as MultimodalBatch.

A dataset family subclasses :class:`MultimodalDataModule` and implements :meth:`load_splits`
(returning arrays for ``train``/``val``/``test``). The base validates them (non-empty, matching
sample counts, finite, labels in ``[0, K)``) with errors that name the split, modality, sample
and source, and exposes what the model needs: ``modalities``, ``input_shapes``, ``num_classes``.

``mmlearn predict`` serves :meth:`MultimodalDataModule.predict_data` (the ``predict_split``, the
test split by default; a family may serve other samples, e.g. a table's ``predict_path``), whose
labels may be unknown (target :data:`UNKNOWN`), and names each sample with
:meth:`MultimodalDataModule.predict_ids`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mmlearn.batch import MultimodalBatch, collate_multimodal
from mmlearn.data.resumable import ResumableBatchSampler, ResumableDataLoader
from mmlearn.errors import MMLearnError

SPLITS = ("train", "val", "test")
#: the target of a sample whose label is unknown (only in what ``mmlearn predict`` serves); a
#: multi-label sample's unknown target is a row of ``UNKNOWN``.
UNKNOWN = -1
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass
class Split:
    """One split: ``inputs[m]`` is ``[N, *shape_m]``, ``target`` is int64 ``[N]``."""

    inputs: dict[str, Tensor]
    target: Tensor


class SplitDataset(Dataset[tuple[dict[str, Tensor], Tensor]]):
    """Index ``i`` -> ``({m: x_m[i]}, y[i])``."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return int(self.split.target.shape[0])

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        return {m: x[i] for m, x in self.split.inputs.items()}, self.split.target[i]


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` every epoch, so the order of epoch ``e`` does not depend on how
    many epochs ran in this process: resuming from a checkpoint reproduces an uninterrupted run.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class MultimodalDataModule(pl.LightningDataModule):
    """Base of every DataModule.

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader workers (0: load in the main process; the data is in memory).
        seed: seed of the split and of the shuffling order; ``None`` follows ``seed_everything``
            (``$PL_GLOBAL_SEED``, 0 when unset), so one seed per run fixes everything.
        predict_split: the split ``mmlearn predict`` serves: ``train``, ``val`` or ``test``.
    """

    #: what the data was read from, named in errors (a path, or a generator description).
    source: str = ""

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        predict_split: str = "test",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise MMLearnError(f"data.batch_size={batch_size}; expected >= 1")
        if num_workers < 0:
            raise MMLearnError(
                f"data.num_workers={num_workers}; expected >= 0 (0: load in the main process)"
            )
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.predict_split = predict_split
        self._check_predict_split()
        self._splits: dict[str, Split] | None = None

    # ---- what a dataset family implements --------------------------------------------------
    def load_splits(self) -> dict[str, Split]:
        """Read or generate ``{"train": Split, "val": Split, "test": Split}``."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes K (labels are ``0..K-1``)."""
        raise NotImplementedError

    @property
    def multilabel(self) -> bool:
        """Whether a sample may have several labels: targets are then multi-hot ``[N, K]``."""
        return False

    # ---- derived facts ---------------------------------------------------------------------
    @property
    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            self._splits = self.load_splits()
            self._validate(self._splits)
        return self._splits

    @property
    def modalities(self) -> list[str]:
        """Modality names, in a fixed order."""
        return list(self.splits["train"].inputs)

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        """Modality -> shape of one sample."""
        return {m: list(x.shape[1:]) for m, x in self.splits["train"].inputs.items()}

    def _validate(self, splits: Mapping[str, Split]) -> None:
        src = self.source or type(self).__name__
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise MMLearnError(
                f"{src}: splits {missing} were not produced; expected {list(SPLITS)}"
            )
        modalities = list(splits["train"].inputs)
        if not modalities:
            raise MMLearnError(f"{src}: the data has no modalities")
        for m in modalities:
            if not _NAME.match(m):
                raise MMLearnError(f"{src}: modality name {m!r} must match {_NAME.pattern}")
        for name in SPLITS:
            self._validate_split(name, splits[name], splits["train"])

    def _validate_split(
        self, name: str, split: Split, train: Split, unknown_ok: bool = False
    ) -> None:
        """Check one split against the training split; ``unknown_ok``: targets may be UNKNOWN."""
        src = self.source or type(self).__name__
        modalities = list(train.inputs)
        k = self.num_classes
        n = int(split.target.shape[0])
        if n == 0:
            raise MMLearnError(f"{src}: the {name!r} split is empty; expected at least 1 sample")
        if list(split.inputs) != modalities:
            raise MMLearnError(
                f"{src}: split {name!r} has modalities {list(split.inputs)}, train has {modalities}"
            )
        if self.multilabel:
            target = split.target
            if unknown_ok and target.ndim == 2:
                target = torch.where((target == UNKNOWN).all(1, keepdim=True), 0, target)
            self._validate_multihot(target, name, k)
        else:
            if split.target.dtype != torch.int64:
                raise MMLearnError(
                    f"{src}: {name} labels have dtype {split.target.dtype}; need int64"
                )
            bad = (split.target < 0) | (split.target >= k)
            if unknown_ok:
                bad &= split.target != UNKNOWN
            where = bad.nonzero()
            if len(where):
                i = int(where[0])
                raise MMLearnError(
                    f"{src}: {name} sample {i} has label {int(split.target[i])}, outside [0, {k})"
                )
        for m, x in split.inputs.items():
            if x.shape[0] != n:
                raise MMLearnError(
                    f"{src}: {name} modality {m!r} has {x.shape[0]} samples, labels have {n}"
                )
            if torch.is_floating_point(x):
                finite = torch.isfinite(x.reshape(n, -1)).all(1)
                if not finite.all():
                    i = int((~finite).nonzero()[0])
                    raise MMLearnError(
                        f"{src}: {name} modality {m!r} sample {i} has NaN or inf features"
                    )
            if list(x.shape[1:]) != list(train.inputs[m].shape[1:]):
                raise MMLearnError(
                    f"{src}: {name} modality {m!r} has sample shape {list(x.shape[1:])}, "
                    f"train has {list(train.inputs[m].shape[1:])}"
                )

    def _validate_multihot(self, target: Tensor, name: str, k: int) -> None:
        src = self.source or type(self).__name__
        if target.ndim != 2 or target.shape[1] != k:
            raise MMLearnError(
                f"{src}: {name} multi-label targets have shape {list(target.shape)}; expected "
                f"[N, {k}] (multi-hot)"
            )
        bad = ((target != 0) & (target != 1)).any(1).nonzero()
        if len(bad):
            i = int(bad[0])
            raise MMLearnError(
                f"{src}: {name} sample {i} has target {target[i].tolist()}; expected 0/1 per label"
            )

    # ---- what `mmlearn predict` serves -------------------------------------------------------
    def _check_predict_split(self) -> str:
        if self.predict_split not in SPLITS:
            raise MMLearnError(
                f"{self.source or type(self).__name__}: data.predict_split="
                f"{self.predict_split!r}; expected one of {list(SPLITS)}"
            )
        return self.predict_split

    def predict_data(self) -> Split:
        """The samples ``mmlearn predict`` serves, in order: the ``predict_split`` split.

        A family may serve other samples (a table's ``predict_path``); their targets may be
        :data:`UNKNOWN`. Check them with ``_validate_split(..., unknown_ok=True)``.
        """
        return self.splits[self._check_predict_split()]

    def predict_ids(self) -> list[str]:
        """One name per sample of :meth:`predict_data`, in order (``predictions.csv``'s ``id``).

        The base: the sample's index in the split. A family with names of its own (a table's id
        column or row numbers) overrides this.
        """
        return [str(i) for i in range(int(self.predict_data().target.shape[0]))]

    # ---- Lightning hooks -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        _ = self.splits  # load and validate before any training step
        if stage == "predict":  # before any prediction: a bad predict file or id column
            _ = self.predict_ids()

    def _loader(self, name: str, shuffle: bool) -> DataLoader[Any]:
        return self._split_loader(self.splits[name], shuffle)

    def _split_loader(self, split: Split, shuffle: bool) -> DataLoader[Any]:
        ds = SplitDataset(split)
        # resumable mid-epoch (a preempted job continues with the very next batch)
        sampler = EpochSeededSampler(len(ds), self.seed, shuffle)
        return ResumableDataLoader(
            ds,
            batch_sampler=ResumableBatchSampler(sampler, self.batch_size, drop_last=False),
            collate_fn=collate_multimodal,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._split_loader(self.predict_data(), shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Compact storage to float32, on the device: uint8 -> ``x / 255``, float16 -> float32.

        Large modalities (frames, spectrograms) stay uint8/float16 in memory and in the loader
        workers, at a half or a quarter of the bytes; the conversion happens per batch on the GPU.
        """
        if isinstance(batch, MultimodalBatch):
            for m, x in batch.inputs.items():
                if x.dtype == torch.uint8:
                    batch.inputs[m] = x.float().div_(255.0)
                elif x.is_floating_point() and x.dtype != torch.float32:
                    batch.inputs[m] = x.float()
        return batch

    def class_frequencies(self) -> Tensor:
        """The training split's class frequencies ``[K]`` (float32): the class prior ``p(y)``.

        Single-label: each class's share of the training samples (sums to 1). Multi-label: each
        label's positive rate (the mean of its multi-hot column). Every process holds the whole
        training split (DDP shards the loader, not :attr:`splits`), so every rank gets the same
        frequencies.
        """
        target = self.splits["train"].target
        if self.multilabel:
            return target.float().mean(0)
        counts = torch.bincount(target, minlength=self.num_classes).float()
        return counts / counts.sum()


def standardize(splits: dict[str, Split]) -> dict[str, Split]:
    """Standardise every float modality with the mean and std of the TRAIN split (per feature).

    Constant features (std 0 on train) are only centred.
    """
    for m, x in splits["train"].inputs.items():
        if not torch.is_floating_point(x):
            continue
        mean = x.mean(0, keepdim=True)
        std = x.std(0, keepdim=True)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        for split in splits.values():
            split.inputs[m] = (split.inputs[m] - mean) / std
    return splits


def stratified_split(
    target: Tensor, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, Tensor]:
    """Indices of a stratified train/val/test split, fixed by ``seed``."""
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise MMLearnError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: expected fractions in "
            "[0, 1) with test > 0 and val + test < 1"
        )
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {s: [] for s in SPLITS}
    for c in target.unique(sorted=True):
        idx = (target == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(test_fraction * len(idx))
        n_val = round(val_fraction * len(idx))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {s: torch.cat(v).sort().values for s, v in parts.items()}
