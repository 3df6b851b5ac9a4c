"""Fashion-MNIST as a multi-view image task: every image cut into parts, one modality per part.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747): 70,000 28x28 grey images of 10
clothing classes, in the IDX format (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``). Debian
ships it in the package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
``mmlearn prepare fashion-mnist`` checks the files against their SHA-256 manifest and copies them
under ``<root>/fashion-mnist``, and so does ``prepare_data`` when that folder lacks a file and the
Debian package is installed. Nothing downloads the files: without the package they must be put
there by hand. :func:`write_fashion_mnist` writes the layout in miniature.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mmlearn.data.base import MultimodalDataModule, Split, standardize, stratified_split
from mmlearn.data.manifest import check_manifest, sha256
from mmlearn.data.paths import PathArg, default_root
from mmlearn.errors import MMLearnError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",  # noqa: E501
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",  # noqa: E501
}
HINT = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; then "
    "prepare_data, which `mmlearn fit` runs, or `mmlearn prepare fashion-mnist --root {root}` "
    "copies it), or put the four IDX .gz files from github.com/zalandoresearch/fashion-mnist in "
    "{root}/fashion-mnist (`mmlearn prepare fashion-mnist --root {root} --source <folder>`)"
)
# view name -> (rows, cols) slice of the 28x28 image
LAYOUTS: dict[str, dict[str, tuple[slice, slice]]] = {
    "halves": {"top": (slice(0, 14), slice(None)), "bottom": (slice(14, 28), slice(None))},
    "left_right": {"left": (slice(None), slice(0, 14)), "right": (slice(None), slice(14, 28))},
    "quadrants": {
        "top_left": (slice(0, 14), slice(0, 14)),
        "top_right": (slice(0, 14), slice(14, 28)),
        "bottom_left": (slice(14, 28), slice(0, 14)),
        "bottom_right": (slice(14, 28), slice(14, 28)),
    },
}


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file (gzip'd): ``[N]`` labels (``dims`` 1) or ``[N, 28, 28]`` images (``dims`` 3)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise MMLearnError(f"{path}: not a readable gzip'd IDX file ({e})") from e
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if magic != 0x0800 + dims:
        raise MMLearnError(
            f"{path}: IDX magic {magic:#x}, expected {0x0800 + dims:#x} "
            f"({'labels' if dims == 1 else 'images'})"
        )
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise MMLearnError(
            f"{path}: header says {shape} ({int(np.prod(shape))} bytes), the file holds {data.size}"
        )
    return data.reshape(shape)


def prepare_fashion_mnist(
    root: str | os.PathLike[str], source: str | os.PathLike[str] | None = None
) -> Path:
    """Check the four IDX files against the manifest and copy them to ``root/fashion-mnist``.

    Args:
        root: the data directory.
        source: a folder with the four files; ``None``: Debian's ``SYSTEM_DIR``.

    Returns:
        ``root/fashion-mnist``.

    Raises:
        FileNotFoundError: ``source`` (or a file of it) does not exist.
        MMLearnError: a file differs from the published one (SHA-256).
    """
    src = Path(source) if source else SYSTEM_DIR
    if not src.is_dir():
        raise FileNotFoundError(f"{src} not found: " + HINT.format(root=root))
    check_manifest(src, FILES)
    out = Path(root) / "fashion-mnist"
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if not (out / name).is_file() or sha256(out / name) != FILES[name]:
            shutil.copyfile(src / name, out / name)
    return out


class FashionMNISTViews(MultimodalDataModule):
    """Fashion-MNIST with each image cut into views (two halves by default), CNN per view.

    Test set: the official 10,000 ``t10k`` images. Validation: ``val_fraction`` of the training
    images, stratified with ``seed``. Pixels are scaled to [0, 1] and standardised per pixel with
    training statistics.

    Args:
        root: folder holding ``fashion-mnist/``; ``None``: ``$MMLEARN_DATA/fashion-mnist`` (or
            ``./data/fashion-mnist``) when it exists, else Debian's
            ``/usr/share/datasets/fashion-mnist``. In a config, relative to that file.
        layout: ``halves`` (top/bottom ``[1, 14, 28]``), ``left_right`` (``[1, 28, 14]``) or
            ``quadrants`` (4 views ``[1, 14, 14]``).
        val_fraction: share of the training images used for validation.
        limit_train: keep only this many training images (a seeded random subset; quick runs).
        limit_test: keep only the first this-many test images.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the validation split and the shuffling (``None``: ``seed_everything``).
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        root: PathArg | None = None,
        layout: Literal["halves", "left_right", "quadrants"] = "halves",
        val_fraction: float = 0.1,
        limit_train: int | None = None,
        limit_test: int | None = None,
        batch_size: int = 128,
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
        if layout not in LAYOUTS:
            raise MMLearnError(f"FashionMNISTViews.layout={layout!r}; expected {sorted(LAYOUTS)}")
        self.layout, self.val_fraction = layout, val_fraction
        self.limit_train, self.limit_test = limit_train, limit_test
        self.root = default_root(root)
        local = self.root / "fashion-mnist"
        self.folder = local if root is not None or local.is_dir() else SYSTEM_DIR
        self.source = str(self.folder)

    # ---- what is known before any file is read (the CLI links it into the model) ----------
    @property
    def modalities(self) -> list[str]:
        return list(LAYOUTS[self.layout])

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        side = range(28)
        return {v: [1, len(side[r]), len(side[c])] for v, (r, c) in LAYOUTS[self.layout].items()}

    @property
    def num_classes(self) -> int:
        return 10

    def prepare_data(self) -> None:
        """Copy Debian's files into ``root/fashion-mnist`` when a file is missing there and the
        package is installed (checked against the SHA-256 manifest); otherwise nothing: loading
        names the missing file and what to install or run."""
        if self.folder == SYSTEM_DIR or all((self.folder / name).is_file() for name in FILES):
            return
        if all((SYSTEM_DIR / name).is_file() for name in FILES):
            prepare_fashion_mnist(self.folder.parent)

    def _read(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = (
            self.folder / f"{part}-{k}-ubyte.gz" for k in ("images-idx3", "labels-idx1")
        )
        for path in (images, labels):
            if not path.is_file():
                raise FileNotFoundError(
                    f"FashionMNISTViews: {path} not found; " + HINT.format(root=self.root)
                )
        x, y = read_idx(images, 3), read_idx(labels, 1)
        if len(x) != len(y):
            raise MMLearnError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
        if x.shape[1:] != (28, 28):
            raise MMLearnError(f"{images}: images are {list(x.shape[1:])}, expected [28, 28]")
        bad = np.flatnonzero(y > 9)
        if bad.size:
            raise MMLearnError(f"{labels}: sample {bad[0]} has label {y[bad[0]]}, outside [0, 10)")
        return x, y

    def load_splits(self) -> dict[str, Split]:
        x_train, y_train = self._read("train")
        x_test, y_test = self._read("t10k")
        target = torch.from_numpy(y_train.astype(np.int64))
        idx = stratified_split(target, 0.0, self.val_fraction, self.seed)  # "test" part = val
        train, val = idx["train"], idx["test"]
        if self.limit_train is not None:
            g = torch.Generator().manual_seed(self.seed)
            train = train[torch.randperm(len(train), generator=g)[: self.limit_train]].sort().values
            val = val[: max(1, self.limit_train // 5)]
        n_test = len(y_test) if self.limit_test is None else self.limit_test
        parts = {
            "train": (x_train[train.numpy()], target[train]),
            "val": (x_train[val.numpy()], target[val]),
            "test": (x_test[:n_test], torch.from_numpy(y_test[:n_test].astype(np.int64))),
        }
        splits = {}
        for name, (x, y) in parts.items():
            images = torch.from_numpy(np.array(x)).float().div_(255.0).unsqueeze(1)  # a copy
            views = {
                v: images[:, :, r, c].contiguous() for v, (r, c) in LAYOUTS[self.layout].items()
            }
            splits[name] = Split(views, y)
        return standardize(splits)


# ---- the layout in miniature (tests, examples; the index is mmlearn.data.fixtures) ----------
def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = (0x0800 + array.ndim).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(magic + dims + array.astype(np.uint8).tobytes())


def write_fashion_mnist(
    root: str | Path, n_train: int = 300, n_test: int = 100, seed: int = 0
) -> Path:
    """``root/fashion-mnist/`` with the four gzip'd IDX files of Fashion-MNIST, in miniature.

    Class ``y`` lights a bar in row band ``y`` of the top half and column band ``y`` of the bottom
    half (plus noise), so each half alone tells the class apart.
    """
    out = Path(root) / "fashion-mnist"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for part, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(y):
            x[i, c : c + 3, :] += 150  # rows c..c+2 (top half)
            x[i, 14:, 2 * c : 2 * c + 3] += 150  # columns in the bottom half
        _write_idx(out / f"{part}-images-idx3-ubyte.gz", np.clip(x, 0, 255))
        _write_idx(out / f"{part}-labels-idx1-ubyte.gz", y)
    return out
