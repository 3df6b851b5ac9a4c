"""MIMIC-III as MultiBench packages it: static admission features + 24 hours of vital signs.

MultiBench (Liang et al., NeurIPS 2021 Datasets and Benchmarks) ships MIMIC-III (Johnson et al.
2016) preprocessed as one pickle, ``im.pk``, a dict with

- ``adm_features_all`` ``[N, 5]``: static admission features (age, 3 chronic conditions, type);
- ``ep_tdata`` ``[N, 24, 12]``: hourly time series over the first 24 hours;
- ``adm_labels_all`` ``[N, 6]``: admission outcomes (mortality task: the first positive of
  columns 1..5 is the class, none -> class 0; 6 classes);
- ``y_icd9`` ``[N, 20]``: ICD-9 code groups (task ``k`` in 0..19: binary, group ``k`` present).

MIMIC-III is credentialed data (PhysioNet): only this reader and a generated miniature
(:func:`write_mimic`) ship, and nothing can fetch it (``prepare_data`` does nothing; loading
without ``im.pk`` is an error naming the path and how to build it).
As in MultiBench, inf/NaN become 0 and 10% / 10% of the shuffled admissions are validation /
test; unlike MultiBench, the standardisation uses training statistics only.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from mmlearn.data.base import MultimodalDataModule, Split, standardize
from mmlearn.data.manifest import check_manifest
from mmlearn.data.paths import PathArg, default_root
from mmlearn.errors import MMLearnError

KEYS = {"adm_features_all": 2, "ep_tdata": 3, "adm_labels_all": 2, "y_icd9": 2}


def read_mimic(path: Path) -> dict[str, np.ndarray]:
    """The arrays of MultiBench's ``im.pk``, checked (keys, ranks, matching sample counts)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"MIMIC: {path} not found; MIMIC-III needs PhysioNet credentials, so it cannot be "
            "fetched: build MultiBench's im.pk (github.com/pliang279/MultiBench, datasets/mimic) "
            "and put it there or pass data.path"
        )
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # MultiBench's format; open only files you made or trust
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise MMLearnError(f"{path}: not a readable pickle ({e})") from e
    if not isinstance(data, dict):
        raise MMLearnError(f"{path}: holds a {type(data).__name__}; expected MultiBench's dict")
    out = {}
    for key, rank in KEYS.items():
        if key not in data:
            raise MMLearnError(f"{path}: key {key!r} missing; keys: {sorted(data)}")
        arr = np.asarray(data[key], dtype=np.float64)
        if arr.ndim != rank:
            raise MMLearnError(f"{path}: {key!r} has shape {list(arr.shape)}; expected rank {rank}")
        out[key] = arr
    counts = {k: len(v) for k, v in out.items()}
    if len(set(counts.values())) != 1:
        raise MMLearnError(f"{path}: sample counts differ between keys: {counts}")
    return out


class MIMIC(MultimodalDataModule):
    """MultiBench's MIMIC-III: ``static`` ``[5]`` (MLP) and ``timeseries`` ``[24, 12]`` (GRU).

    Args:
        path: MultiBench's ``im.pk``; ``None``: ``$MMLEARN_DATA/mimic/im.pk`` (or
            ``./data/mimic/im.pk``). In a config, relative to that file.
        task: ``-1`` mortality (6 classes, MultiBench's task -1) or ``0..19``: ICD-9 group ``k``
            (binary).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the split and the shuffling (``None``: follows ``seed_everything``).
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        path: PathArg | None = None,
        task: int = -1,
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
        if not -1 <= task <= 19:
            raise MMLearnError(f"MIMIC.task={task}; expected -1 (mortality) or 0..19 (ICD-9 group)")
        self.path = Path(path) if path is not None else default_root() / "mimic" / "im.pk"
        self.task = task
        self.source = str(self.path)

    @property
    def num_classes(self) -> int:
        return 6 if self.task < 0 else 2

    def load_splits(self) -> dict[str, Split]:
        check_manifest(self.path.parent, full=False)
        data = read_mimic(self.path)
        static = np.nan_to_num(data["adm_features_all"], nan=0.0, posinf=0.0, neginf=0.0)
        series = np.nan_to_num(data["ep_tdata"], nan=0.0, posinf=0.0, neginf=0.0)
        if self.task < 0:
            outcome = data["adm_labels_all"][:, 1:6] > 0
            y = np.where(outcome.any(1), outcome.argmax(1) + 1, 0)
        else:
            y = (data["y_icd9"][:, self.task] > 0).astype(np.int64)
        n = len(y)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        parts = {"val": order[: n // 10], "test": order[n // 10 : n // 5], "train": order[n // 5 :]}
        x_s = torch.from_numpy(static).float()
        x_t = torch.from_numpy(series).float()
        target = torch.from_numpy(np.asarray(y, dtype=np.int64))
        splits = {
            s: Split({"static": x_s[i], "timeseries": x_t[i]}, target[i]) for s, i in parts.items()
        }
        return standardize(splits)


# ---- the layout in miniature (tests, examples; the index is mmlearn.data.fixtures) ----------
def write_mimic(root: str | Path, n: int = 300, seed: int = 0) -> Path:
    """``root/mimic/im.pk`` with MultiBench's keys and shapes, in miniature.

    Mortality class ``c`` (0..5) shifts static feature ``c % 5`` and time-series channel ``c``;
    ICD-9 group 0 follows ``c > 2``. A few NaN/inf values appear, as in the real pickle.
    """
    rng = np.random.default_rng(seed)
    c = np.arange(n) % 6
    rng.shuffle(c)
    static = rng.normal(size=(n, 5))
    series = rng.normal(size=(n, 24, 12))
    static[np.arange(n), c % 5] += 2.5
    series[np.arange(n), :, c] += 1.5
    static[0, 1], series[1, 3, 2] = np.nan, np.inf
    labels = np.zeros((n, 6))
    labels[c > 0, c[c > 0]] = 1
    icd9 = rng.integers(0, 2, size=(n, 20)).astype(np.float64)
    icd9[:, 0] = c > 2
    data = {
        "adm_features_all": static,
        "ep_tdata": series,
        "adm_labels_all": labels,
        "y_icd9": icd9,
    }
    out = Path(root) / "mimic"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "im.pk", "wb") as f:
        pickle.dump(data, f)
    return out / "im.pk"
