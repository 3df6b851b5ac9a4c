"""The DataModule base: in-memory multi-modal splits, validated once, served as MultimodalBatch.

A dataset family subclasses :class:`MultimodalDataModule` and implements :meth:`load_splits`
(returning arrays for ``train``/``val``/``test``). The base validates them (non-empty, matching
sample counts, finite, labels in ``[0, K)``) with errors that name the split, modality, sample
and source, and exposes what the model needs: ``modalities``, ``input_shapes``, ``num_classes``.

``mmlearn predict`` serves :meth:`MultimodalDataModule.predict_data` (the ``predict_split``, the
test split by default; a family may serve other samples, e.g. a table's ``predict_path``), whose
labels may be unknown (target :data:`UNKNOWN`), and names each sample with
:meth:`MultimodalDataModule.predict_ids`.

Three options every family has (docs/datasets.md, "Options every DataModule has"):
``modality_dropout`` (training-time modality dropout, ModDrop: Neverova et al., TPAMI 2016),
``modality_dropout_fill`` (what replaces a removed input) and ``train_fraction`` (train on a
stratified fraction of the training split). :meth:`MultimodalDataModule.input_means` are the
training split's input means; they travel in every checkpoint (:meth:`~MultimodalDataModule.
state_dict`) and :func:`stored_input_means` finds them there.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
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
#: what replaces the input of a modality that ``modality_dropout`` removes
FILLS = ("mean", "zero")
# streams of :func:`mix_seed`, so that the masks and the training subset draw numbers that are
# independent of each other and of the shuffling order
_MASK_STREAM, _FRACTION_STREAM = 0x6D61736B, 0x66726163
# elements per chunk when the input means are summed (float64): 128 MiB at most at a time
_MEAN_CHUNK = 1 << 24


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


def mix_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` from integers (splitmix64 over the parts), for ``manual_seed``.

    Neighbouring inputs (epoch 3 and 4, seed 0 and 1) give unrelated seeds, unlike a sum.
    """
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


def modality_dropout_masks(n: int, probabilities: Sequence[float], seed: int, epoch: int) -> Tensor:
    """Which modalities each of ``n`` training samples keeps in ``epoch``: bool ``[n, M]``.

    Each modality ``j`` is removed independently with ``probabilities[j]``; a sample that would
    lose every modality is drawn again (until it keeps one), so the masks follow the independent
    draws conditioned on "at least one modality kept". Row ``i`` is sample ``i``'s mask, a
    function of ``(seed, epoch, i)`` (and ``n``) only: not of the global RNG, the shuffling
    order, the loader workers or where a resumed epoch starts.
    """
    p = torch.tensor([float(v) for v in probabilities], dtype=torch.float64)
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, _MASK_STREAM))
    keep = torch.rand(n, len(p), generator=g, dtype=torch.float64) >= p
    lost = (~keep.any(1)).nonzero().flatten()
    while len(lost):  # ends: every probability is < 1, so a redraw keeps one with p > 0
        keep[lost] = torch.rand(len(lost), len(p), generator=g, dtype=torch.float64) >= p
        lost = lost[~keep[lost].any(1)]
    return keep


class DropoutBatchSampler(ResumableBatchSampler):
    """Batches of ``(i, keep)``: each training index with its modality mask for the epoch.

    The masks are attached here, in the main process, to whatever indices the sampler yields:
    the DataModule's :class:`EpochSeededSampler`, or the ``DistributedSampler`` Lightning puts in
    its place under DDP (Lightning re-creates this batch sampler around it, with these
    arguments). Row ``i`` of :func:`modality_dropout_masks` of ``(seed, epoch)`` is sample ``i``'s
    mask on every rank, whatever the order; the epoch is the sampler's (Lightning's
    ``set_epoch``). The masks travel to the loader workers with the indices, so they do not depend
    on ``num_workers``.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        probabilities: Sequence[float] = (),
        seed: int = 0,
        n: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.probabilities, self.seed, self.n = [float(p) for p in probabilities], seed, n

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def masks(self) -> Tensor:
        """This epoch's masks, bool ``[n, M]`` (row ``i``: sample ``i``)."""
        return modality_dropout_masks(self.n, self.probabilities, self.seed, self.epoch)

    def __iter__(self) -> Iterator[list[Any]]:  # type: ignore[override]
        rows = self.masks().tolist()
        for batch in super().__iter__():
            yield [(i, tuple(rows[i])) for i in batch]


class MaskedSplitDataset(Dataset[tuple[dict[str, Tensor], Tensor, tuple[bool, ...]]]):
    """``(i, keep)`` -> ``({m: x_m[i]}, y[i], keep)``: a sample with its modality mask."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return int(self.split.target.shape[0])

    def __getitem__(
        self, item: tuple[int, tuple[bool, ...]]
    ) -> tuple[dict[str, Tensor], Tensor, tuple[bool, ...]]:
        i, keep = item
        return {m: x[i] for m, x in self.split.inputs.items()}, self.split.target[i], keep


def fill_absent(batch: MultimodalBatch, fills: Mapping[str, Tensor]) -> MultimodalBatch:
    """Replace, in place, the inputs of absent modalities (``batch.present``) by their fill.

    A fill is used only where its dtype is the batch's: the loader fills what is stored as the
    model sees it (float32, or zeros in the storage dtype), and ``on_after_batch_transfer``
    fills compact storage (uint8, float16) after converting it to float32. Filling twice is a
    no-op.
    """
    if batch.present is None:
        return batch
    for m, fill in fills.items():
        mask, x = batch.present.get(m), batch.inputs.get(m)
        if mask is None or x is None or x.dtype != fill.dtype or bool(mask.all()):
            continue
        keep = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        batch.inputs[m] = torch.where(keep, x, fill.to(x.device))
    return batch


class DropoutCollate:
    """Collates ``(inputs, target, keep)`` samples: ``present`` from the masks, fills applied.

    A module-level class (not a closure), so that loader workers can receive it however they
    start.
    """

    def __init__(self, modalities: Sequence[str], fills: Mapping[str, Tensor]) -> None:
        self.modalities, self.fills = list(modalities), dict(fills)

    def __call__(
        self, samples: Sequence[tuple[Mapping[str, Tensor], Tensor, Sequence[bool]]]
    ) -> MultimodalBatch:
        batch = collate_multimodal([(x, y) for x, y, _ in samples])
        keep = torch.tensor([list(k) for _, _, k in samples], dtype=torch.bool)
        batch.present = {m: keep[:, j].clone() for j, m in enumerate(self.modalities)}
        return fill_absent(batch, self.fills)


def _model_mean(x: Tensor) -> Tensor | None:
    """Element-wise mean over samples of what the model sees (uint8 / 255; floats as float32).

    ``None`` for integer inputs (token ids): their mean is no input. Summed in float64, a chunk
    of rows at a time, so a memory-mapped split is read once without a float copy of it.
    """
    if x.dtype == torch.uint8:
        scale = 1.0 / 255.0
    elif torch.is_floating_point(x):
        scale = 1.0
    else:
        return None
    n = int(x.shape[0])
    per_sample = max(1, math.prod(x.shape[1:]))
    rows = max(1, _MEAN_CHUNK // per_sample)
    total = torch.zeros(x.shape[1:], dtype=torch.float64)
    for start in range(0, n, rows):
        total += x[start : start + rows].to(torch.float64).sum(0)
    return (total * (scale / n)).float()


def stored_input_means(checkpoint: Mapping[str, Any]) -> dict[str, Tensor | None] | None:
    """The input means a checkpoint holds (:meth:`MultimodalDataModule.state_dict`), or None.

    Lightning saves a DataModule's state under its class's ``__qualname__``
    (``checkpoint["SyntheticMultimodal"]["input_means"]``); any class's entry is found.

    Args:
        checkpoint: a loaded checkpoint (``torch.load`` of a ``.ckpt``).

    Returns:
        modality -> mean (``None`` for token ids), or ``None`` when the checkpoint has none (a
        checkpoint written before the means were stored, or without a DataModule).
    """
    for value in checkpoint.values():
        if isinstance(value, Mapping) and isinstance(value.get("input_means"), Mapping):
            return dict(value["input_means"])
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_dropout(owner: str, value: object) -> float | dict[str, float]:
    """``modality_dropout`` checked: a probability in [0, 1), or name -> probability."""
    expected = "expected a probability in [0, 1) or a mapping modality -> probability in [0, 1)"
    if _is_number(value):
        p = float(value)  # type: ignore[arg-type]
        if 0 <= p < 1:
            return p
        raise MMLearnError(f"{owner}: data.modality_dropout={value!r}; {expected}")
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for m, p in value.items():
            if not isinstance(m, str) or not _is_number(p) or not 0 <= float(p) < 1:
                raise MMLearnError(
                    f"{owner}: data.modality_dropout={dict(value)!r}: {m!r} has {p!r}; "
                    "expected a probability in [0, 1) per modality name"
                )
            out[m] = float(p)
        return out
    raise MMLearnError(f"{owner}: data.modality_dropout={value!r}; {expected}")


class MultimodalDataModule(pl.LightningDataModule):
    """Base of every DataModule.

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader workers (0: load in the main process; the data is in memory).
        seed: seed of the split and of the shuffling order; ``None`` follows ``seed_everything``
            (``$PL_GLOBAL_SEED``, 0 when unset), so one seed per run fixes everything.
        predict_split: the split ``mmlearn predict`` serves: ``train``, ``val`` or ``test``.
        modality_dropout: training-time modality dropout (ModDrop, Neverova et al., TPAMI 2016):
            one probability in ``[0, 1)`` for every modality, or modality name -> probability
            (modalities not named: 0). Per training sample and epoch each modality is
            removed independently; a sample that would lose all of them is drawn again. The
            masks are a function of ``seed``, the epoch and the sample's index only. Training
            batches then carry ``present`` and the removed inputs are replaced by the fill.
            Validation, test and predict batches are never dropped.
        modality_dropout_fill: what replaces a removed input: ``mean`` (the training mean of
            that modality's input, :meth:`input_means`) or ``zero``. Integer inputs (token ids)
            have no mean: with ``mean``, a probability > 0 for one is an error.
        train_fraction: train on this stratified random fraction of the training split, in
            ``(0, 1]`` (per class ``round(fraction * n_class)`` samples, fixed by ``seed``; the
            kept samples are copied into memory). Taken after the split is made, so val and test
            are unchanged; class frequencies, input means and the loader use the reduced split.
            Statistics a family computes inside ``load_splits`` (the standardisation of mfeat,
            Fashion-MNIST, MIMIC, tables) come from the full training split.
    """

    #: what the data was read from, named in errors (a path, or a generator description).
    source: str = ""

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        predict_split: str = "test",
        modality_dropout: float | dict[str, float] = 0.0,
        modality_dropout_fill: str = "mean",
        train_fraction: float = 1.0,
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
        self.modality_dropout = _check_dropout(type(self).__name__, modality_dropout)
        if modality_dropout_fill not in FILLS:
            raise MMLearnError(
                f"{type(self).__name__}: data.modality_dropout_fill={modality_dropout_fill!r}; "
                f"expected one of {list(FILLS)}"
            )
        self.modality_dropout_fill = modality_dropout_fill
        if not (_is_number(train_fraction) and 0 < train_fraction <= 1):
            raise MMLearnError(
                f"{type(self).__name__}: data.train_fraction={train_fraction!r}; expected a "
                "fraction in (0, 1] (1: the whole training split)"
            )
        self.train_fraction = float(train_fraction)
        #: positions in the loaded training split that ``train_fraction`` keeps (None: all)
        self.train_indices: Tensor | None = None
        self._splits: dict[str, Split] | None = None
        self._input_means: dict[str, Tensor | None] | None = None
        self._input_means_source = ""
        self._fills: dict[str, Tensor] = {}  # modality -> fill, while dropout is on
        self._device_fills: dict[tuple[str, str], Tensor] = {}

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
            splits = self.load_splits()
            self._validate(splits)
            if self.train_fraction < 1:  # after the split, before anything reads train
                self.train_indices = self._train_subset(splits["train"].target)
                train = splits["train"]
                splits = dict(splits)
                splits["train"] = Split(
                    {m: x[self.train_indices] for m, x in train.inputs.items()},
                    train.target[self.train_indices],
                )
            self._splits = splits
        return self._splits

    def _train_subset(self, target: Tensor) -> Tensor:
        """Sorted positions of the ``train_fraction`` kept, stratified by class.

        Multi-label data is stratified by each sample's first label (no label: a stratum of
        its own), as the cached families split off validation.
        """
        src = self.source or type(self).__name__
        if target.ndim == 2:
            strata = torch.where(target.bool().any(1), target.float().argmax(1), -1)
        else:
            strata = target
        names = getattr(self, "classes", None)
        g = torch.Generator().manual_seed(mix_seed(self.seed, _FRACTION_STREAM))
        kept = []
        for c in strata.unique(sorted=True).tolist():
            idx = (strata == c).nonzero().flatten()
            k = math.floor(self.train_fraction * len(idx) + 0.5)  # round half up
            if k == 0:
                what = "no label" if c < 0 else f"class {c}"
                if c >= 0 and isinstance(names, (list, tuple)) and c < len(names):
                    what += f" ({names[c]!r})"
                raise MMLearnError(
                    f"{src}: data.train_fraction={self.train_fraction} keeps no training sample "
                    f"of {what}, which has {len(idx)}; expected a fraction >= "
                    f"{0.5 / len(idx):.3g}, which keeps at least one sample per class"
                )
            kept.append(idx[torch.randperm(len(idx), generator=g)[:k]])
        return torch.cat(kept).sort().values

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
        if stage in (None, "fit"):  # the modalities are known now: check the dropout options
            self.dropout_probabilities()
        if stage == "predict":  # before any prediction: a bad predict file or id column
            _ = self.predict_ids()

    # ---- modality dropout ------------------------------------------------------------------
    def dropout_probabilities(self) -> dict[str, float]:
        """Modality -> its dropout probability (``modality_dropout`` resolved on the data).

        Raises:
            MMLearnError: a named modality is not in the data; a single modality (a sample
                never loses all, so nothing could be removed); an integer modality (token ids)
                with a probability > 0 and ``modality_dropout_fill: mean``.
        """
        src = self.source or type(self).__name__
        train = self.splits["train"]
        modalities = list(train.inputs)
        value = self.modality_dropout
        if isinstance(value, dict):
            unknown = [m for m in value if m not in train.inputs]
            if unknown:
                raise MMLearnError(
                    f"{src}: data.modality_dropout={value!r} names modalities {unknown} that the "
                    f"data does not have; its modalities are {modalities}"
                )
            probabilities = {m: float(value.get(m, 0.0)) for m in modalities}
        else:
            probabilities = dict.fromkeys(modalities, float(value))
        dropped = [m for m, p in probabilities.items() if p > 0]
        if dropped and len(modalities) == 1:
            raise MMLearnError(
                f"{src}: data.modality_dropout={value!r}, but the data has a single modality "
                f"({modalities[0]!r}) and a sample never loses all its modalities; expected 0"
            )
        if self.modality_dropout_fill == "mean":
            for m in dropped:
                x = train.inputs[m]
                if not (torch.is_floating_point(x) or x.dtype == torch.uint8):
                    raise MMLearnError(
                        f"{src}: data.modality_dropout={value!r} removes modality {m!r}, whose "
                        f"inputs are {x.dtype} (token ids) and have no mean to fill in; set "
                        f"data.modality_dropout_fill=zero (token id 0), or give {m!r} "
                        "probability 0 in a per-modality mapping"
                    )
        return probabilities

    def _dropout_fills(self, probabilities: Mapping[str, float]) -> dict[str, Tensor]:
        """Modality -> the value its removed inputs become, for each modality with p > 0.

        ``zero``: zeros in the storage dtype (zero after the float conversion too). ``mean``:
        :meth:`input_means` in float32 (possibly restored from a checkpoint: checked here).
        """
        src = self.source or type(self).__name__
        train = self.splits["train"]
        dropped = [m for m, p in probabilities.items() if p > 0]
        if self.modality_dropout_fill == "zero":
            return {
                m: torch.zeros(train.inputs[m].shape[1:], dtype=train.inputs[m].dtype)
                for m in dropped
            }
        means = self.input_means()
        fills = {}
        for m in dropped:
            mean, shape = means.get(m), list(train.inputs[m].shape[1:])
            if mean is None or list(mean.shape) != shape:
                got = "no mean" if mean is None else f"a mean of shape {list(mean.shape)}"
                raise MMLearnError(
                    f"{src}: the input means ({self._input_means_source}) have {got} for "
                    f"modality {m!r}, whose samples are {shape}: they were restored from a "
                    "checkpoint of other data; resume with the run's data, or set "
                    "data.modality_dropout_fill=zero"
                )
            fills[m] = mean.to(torch.float32)
        return fills

    # ---- the training split's input means (stored with the run) ----------------------------
    def input_means(self) -> dict[str, Tensor | None]:
        """Modality -> the training split's mean input (the sample shape, float32), cached.

        The element-wise mean over training samples of what the model sees: uint8 storage
        divided by 255, float16 as float32 (``on_after_batch_transfer``). ``None`` for integer
        inputs (token ids). With ``train_fraction``, the mean of the reduced split. A
        checkpoint's means (:meth:`load_state_dict`) replace these.
        """
        if self._input_means is None:
            train = self.splits["train"]
            n = int(train.target.shape[0])
            self._input_means = {m: _model_mean(x) for m, x in train.inputs.items()}
            fraction = f", train_fraction={self.train_fraction}" if self.train_fraction < 1 else ""
            self._input_means_source = f"training split ({n} samples{fraction})"
        return dict(self._input_means)

    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves in every checkpoint, under ``type(self).__qualname__``.

        ``{"input_means": {modality: Tensor | None}, "input_means_source": str}``: the training
        means (:meth:`input_means`, one pass over the training tensors the first time) and what
        they were computed from.
        """
        means = self.input_means()
        return {
            "input_means": {m: None if v is None else v.clone() for m, v in means.items()},
            "input_means_source": self._input_means_source,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the input means of a checkpoint (a state without them changes nothing).

        A resumed run then fills removed inputs with the means it trained with, even if the
        data changed since. Lightning calls this after ``setup``, before the loaders are built.
        """
        means = state_dict.get("input_means")
        if not isinstance(means, Mapping):
            return  # a checkpoint written before the means were stored
        self._input_means = {
            str(m): None if v is None else torch.as_tensor(v).detach().cpu().float()
            for m, v in means.items()
        }
        source = state_dict.get("input_means_source") or "unknown data"
        self._input_means_source = f"{source}, restored from a checkpoint"
        self._device_fills.clear()

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
        """The training loader; with ``modality_dropout``, batches carry ``present`` and the
        removed inputs are filled (in the loader where the fill has the storage dtype, else on
        the device in :meth:`on_after_batch_transfer`)."""
        probabilities = self.dropout_probabilities()
        if not any(p > 0 for p in probabilities.values()):
            self._fills = {}
            return self._loader("train", shuffle=True)
        self._fills, self._device_fills = self._dropout_fills(probabilities), {}
        split = self.splits["train"]
        n = len(split.target)
        order = EpochSeededSampler(n, self.seed, shuffle=True)
        batches = DropoutBatchSampler(
            order, self.batch_size, False, list(probabilities.values()), self.seed, n
        )
        return ResumableDataLoader(
            MaskedSplitDataset(split),
            batch_sampler=batches,
            collate_fn=DropoutCollate(list(probabilities), self._fills),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

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
            if self._fills and batch.present is not None:
                # modality dropout: the fills the loader could not apply to compact storage
                fill_absent(batch, {m: self._device_fill(m, batch) for m in self._fills})
        return batch

    def _device_fill(self, m: str, batch: MultimodalBatch) -> Tensor:
        """The fill of ``m`` on the batch's device, copied there once."""
        device = batch.inputs[m].device
        key = (m, str(device))
        if key not in self._device_fills:
            self._device_fills[key] = self._fills[m].to(device)
        return self._device_fills[key]

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
