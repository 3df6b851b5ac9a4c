"""DataModules whose samples are decoded once into per-split memory maps.

Decoding images, clips or texts at every step starves a GPU. A :class:`CachedDataModule` decodes
each sample once, in Lightning's ``prepare_data`` (once per node, before any rank trains), into
``<cache>/<split>_<modality>.npy`` and ``<split>_labels.npy``, records ``MANIFEST.json`` (SHA-256
and size per file) and ``meta.json`` (everything the cache depends on: settings, sample lists,
labels). The cache is rebuilt when ``meta.json`` differs from what the settings now give;
training memory-maps the arrays copy-on-write, so batches read only their rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmlearn.data.base import SPLITS, MultimodalDataModule, Split, stratified_split
from mmlearn.data.manifest import check_manifest, write_manifest
from mmlearn.data.paths import PathArg, default_root
from mmlearn.errors import MMLearnError


@dataclass
class SplitPlan:
    """How one split is cached.

    Attributes:
        decode: yields ``{modality: Tensor}`` (or ``(that, label)``) for sample ``i``.
        layout: modality -> (sample shape, numpy dtype) of what ``decode`` yields.
        arrays: saved as they are: ``labels`` and any modality computed in bulk.
    """

    decode: Dataset[Any]
    layout: dict[str, tuple[list[int], Any]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class CachedDataModule(MultimodalDataModule):
    """Base of the loaders that decode once: subclasses give the plan and the meta.

    Args:
        name: the dataset folder under ``root``; the cache is ``<root>/<name>/cache``.
        root: ``None``: ``$MMLEARN_DATA`` or ``./data``.
        val_fraction: without a validation list, this share of train (stratified, ``seed``).
        prepare_workers: processes decoding samples when the cache is built.
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        name: str,
        root: PathArg | None,
        val_fraction: float,
        prepare_workers: int,
        batch_size: int,
        num_workers: int,
        seed: int | None,
        predict_split: str = "test",
        modality_dropout: float | dict[str, float] = 0.0,
        modality_dropout_fill: str = "mean",
        train_fraction: float = 1.0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            predict_split=predict_split,
            modality_dropout=modality_dropout,
            modality_dropout_fill=modality_dropout_fill,
            train_fraction=train_fraction,
        )
        self.folder = default_root(root) / name
        self.cache = self.folder / "cache"
        self.val_fraction, self.prepare_workers = val_fraction, prepare_workers
        self.source = str(self.folder)

    def split_off_val(self, lists: dict[str, list[Any]], strata: list[int]) -> None:
        """Without ``lists["val"]``, move ``val_fraction`` of ``lists["train"]`` (stratified by
        ``strata``, one class index per train item) into it."""
        if "val" in lists:
            return
        train = lists["train"]
        idx = stratified_split(torch.tensor(strata), 0.0, self.val_fraction, self.seed)
        lists["val"] = [train[i] for i in idx["test"].tolist()]
        lists["train"] = [train[i] for i in idx["train"].tolist()]

    def cache_meta(self) -> dict[str, Any]:
        """Everything the cache depends on (JSON-serialisable)."""
        raise NotImplementedError

    def cache_plan(self) -> dict[str, SplitPlan]:
        """``{split: SplitPlan}`` for ``train``, ``val`` and ``test``."""
        raise NotImplementedError

    def cache_is_current(self) -> bool:
        meta = self.cache / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()) == self.cache_meta()

    def prepare_data(self) -> None:
        """Decode every sample once into the cache (skipped when it is current)."""
        if self.cache_is_current():
            return
        plans = self.cache_plan()  # reads the lists first: missing data leaves no folder behind
        self.cache.mkdir(parents=True, exist_ok=True)
        (self.cache / "meta.json").unlink(missing_ok=True)  # an interrupted build stays stale
        written = []
        for split, plan in plans.items():
            n = len(plan.decode)  # type: ignore[arg-type]
            maps = {
                m: np.lib.format.open_memmap(
                    self.cache / f"{split}_{m}.npy", mode="w+", dtype=dtype, shape=(n, *shape)
                )
                for m, (shape, dtype) in plan.layout.items()
            }
            loader = DataLoader(plan.decode, batch_size=None, num_workers=self.prepare_workers)
            for i, sample in enumerate(loader):
                values = sample[0] if isinstance(sample, (tuple, list)) else sample
                for m, out in maps.items():
                    out[i] = values[m].numpy()
            for out in maps.values():
                out.flush()
            written += [self.cache / f"{split}_{m}.npy" for m in maps]
            del maps
            for name, array in plan.arrays.items():
                np.save(self.cache / f"{split}_{name}.npy", array)
                written.append(self.cache / f"{split}_{name}.npy")
        write_manifest(self.cache, written)
        (self.cache / "meta.json").write_text(json.dumps(self.cache_meta()))

    def load_splits(self) -> dict[str, Split]:
        if not self.cache_is_current():
            raise MMLearnError(
                f"{self.cache} is missing or was built with other settings or sample lists: "
                f"`mmlearn fit` rebuilds it in prepare_data (or call prepare_data() yourself)"
            )
        check_manifest(self.cache, full=False)

        def load(split: str, name: str) -> torch.Tensor:
            return torch.from_numpy(np.load(self.cache / f"{split}_{name}.npy", mmap_mode="c"))

        return {
            s: Split({m: load(s, m) for m in self.modalities}, load(s, "labels")) for s in SPLITS
        }
