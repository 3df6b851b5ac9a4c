"""AV-MNIST in the MultiBench layout: MNIST digits paired with spoken-digit spectrograms.

AV-MNIST (Vielzeuf et al. 2018, "CentralNet"; the MultiBench release, Liang et al. 2021) pairs
each MNIST image with a 112x112 spectrogram of a spoken digit of the same class (FSDD, with
noise). MultiBench's folder::

    avmnist/image/train_data.npy   [60000, 784]  (or [N, 28, 28])
    avmnist/image/test_data.npy    [10000, 784]
    avmnist/audio/train_data.npy   [60000, 112, 112]
    avmnist/audio/test_data.npy    [10000, 112, 112]
    avmnist/train_labels.npy       [60000]   digits 0..9
    avmnist/test_labels.npy        [10000]

As in MultiBench, the last 5,000 training pairs are the validation split and both modalities are
divided by 255. ``mmlearn prepare avmnist --root DIR`` checks the layout and writes its manifest.
AV-MNIST is not redistributed, so nothing fetches it: ``prepare_data`` does nothing and loading
without the folder is an error naming it. :func:`write_avmnist` writes the layout in miniature.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from mmlearn.data.base import MultimodalDataModule, Split
from mmlearn.data.manifest import check_manifest, write_manifest
from mmlearn.data.paths import PathArg, default_root
from mmlearn.errors import MMLearnError

FILES = {
    "image": ("image/train_data.npy", "image/test_data.npy"),
    "audio": ("audio/train_data.npy", "audio/test_data.npy"),
    "label": ("train_labels.npy", "test_labels.npy"),
}
SHAPES: dict[str, list[tuple[int, ...]]] = {"image": [(784,), (28, 28)], "audio": [(112, 112)]}
HINT = (
    "AV-MNIST is not redistributed, so it cannot be fetched: get MultiBench's avmnist folder "
    "(github.com/pliang279/MultiBench, datasets/avmnist), unpack it as {folder} and run "
    "`mmlearn prepare avmnist --root {root}` (or `--source <that folder>` to copy it there)"
)


def _load(folder: Path, rel: str) -> np.ndarray:
    """``folder/rel`` as a read-only memory map; a missing file names the folder and the way."""
    path = folder / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"AVMNIST: {path} not found; " + HINT.format(folder=folder, root=folder.parent)
        )
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise MMLearnError(f"{path}: not a readable .npy array ({e})") from e


def read_avmnist(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{"train"|"test": {"image", "audio", "label"}}`` as memory maps, layout checked."""
    parts: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    for key, rels in FILES.items():
        for part, rel in zip(("train", "test"), rels, strict=True):
            arr = _load(folder, rel)
            if key == "label":
                if arr.ndim != 1:
                    raise MMLearnError(f"{folder / rel}: shape {list(arr.shape)}, expected [N]")
                bad = np.flatnonzero((arr < 0) | (arr > 9))
                if bad.size:
                    raise MMLearnError(
                        f"{folder / rel}: sample {bad[0]} has label {arr[bad[0]]}, outside [0, 10)"
                    )
            elif tuple(arr.shape[1:]) not in SHAPES[key]:
                raise MMLearnError(
                    f"{folder / rel}: samples of shape {list(arr.shape[1:])}, expected one of "
                    f"{[list(s) for s in SHAPES[key]]}"
                )
            parts[part][key] = arr
    for part, arrays in parts.items():
        counts = {k: len(v) for k, v in arrays.items()}
        if len(set(counts.values())) != 1:
            files = {FILES[k][part == "test"]: n for k, n in counts.items()}
            raise MMLearnError(f"AVMNIST {folder}: {part} sample counts differ: {files}")
    return parts


def prepare_avmnist(
    root: str | os.PathLike[str], source: str | os.PathLike[str] | None = None
) -> Path:
    """Copy MultiBench's ``avmnist`` folder from ``source`` (if given) to ``root/avmnist``, check
    its layout and record its manifest (SHA-256 and size per file).

    Without ``source``, a folder prepared before is re-hashed against its manifest first, so a file
    that changed since is reported rather than silently re-recorded.
    """
    folder = Path(root) / "avmnist"
    if source is not None:
        for rel in (r for rels in FILES.values() for r in rels):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(source) / rel, folder / rel)
    else:
        check_manifest(folder, full=True)
    read_avmnist(folder)
    write_manifest(folder, [folder / r for rels in FILES.values() for r in rels])
    return folder


def _compact(arr: np.ndarray) -> torch.Tensor:
    """uint8 stays uint8 (scaled on the device); anything else becomes float16 in [0, 1]."""
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.array(arr))  # a writable copy of the memory map
    return torch.from_numpy((np.asarray(arr, dtype=np.float32) / 255.0).astype(np.float16))


class AVMNIST(MultimodalDataModule):
    """AV-MNIST: ``image`` ``[1, 28, 28]`` and ``audio`` ``[1, 112, 112]`` (CNN encoders).

    Args:
        root: folder holding ``avmnist/``; ``None``: ``$MMLEARN_DATA`` or ``./data``. In a config,
            relative to that file.
        val_size: the last ``val_size`` training pairs are the validation split (MultiBench: 5000).
        limit_train: keep only the first this-many training pairs (quick runs).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the shuffling (``None``: follows ``seed_everything``).
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        root: PathArg | None = None,
        val_size: int = 5000,
        limit_train: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
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
        self.folder = default_root(root) / "avmnist"
        self.val_size, self.limit_train = val_size, limit_train
        self.source = str(self.folder)

    @property
    def num_classes(self) -> int:
        return 10

    def load_splits(self) -> dict[str, Split]:
        check_manifest(self.folder, full=False)
        parts = read_avmnist(self.folder)
        n = len(parts["train"]["label"])
        if not 0 < self.val_size < n:
            raise MMLearnError(f"AVMNIST.val_size={self.val_size}; expected 1..{n - 1}")
        end = (
            n - self.val_size
            if self.limit_train is None
            else min(self.limit_train, n - self.val_size)
        )
        ranges = {
            "train": ("train", slice(0, end)),
            "val": ("train", slice(n - self.val_size, n)),
            "test": ("test", slice(None)),
        }
        splits = {}
        for name, (part, rows) in ranges.items():
            arrays = parts[part]
            image = _compact(arrays["image"][rows]).reshape(-1, 1, 28, 28)
            audio = _compact(arrays["audio"][rows]).reshape(-1, 1, 112, 112)
            target = torch.from_numpy(np.array(arrays["label"][rows], dtype=np.int64))  # a copy
            splits[name] = Split({"image": image, "audio": audio}, target)
        return splits


# ---- the layout in miniature (tests, examples; the index is mmlearn.data.fixtures) ----------
def write_avmnist(root: str | Path, n_train: int = 150, n_test: int = 50, seed: int = 0) -> Path:
    """``root/avmnist/`` in MultiBench's layout, in miniature.

    Images are uint8 ``[N, 784]`` with a bright row band per class; spectrograms are float64
    ``[N, 112, 112]`` in [0, 255] with a bright frequency band per class (MultiBench's arrays
    come in both kinds of dtype; the reader takes either).
    """
    out = Path(root) / "avmnist"
    for sub in ("image", "audio"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for part, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        img = rng.integers(0, 50, size=(n, 28, 28))
        spec = rng.uniform(0, 60, size=(n, 112, 112))
        for i, c in enumerate(y):
            img[i, 2 * c + 3 : 2 * c + 6, :] += 180
            spec[i, 10 * c + 5 : 10 * c + 12, :] += 150
        np.save(out / "image" / f"{part}_data.npy", img.reshape(n, 784).astype(np.uint8))
        np.save(out / "audio" / f"{part}_data.npy", spec)
        np.save(out / f"{part}_labels.npy", y.astype(np.int64))
    return out
