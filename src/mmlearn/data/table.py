"""``TableDataModule``: a user's own data, one row per sample, modalities as groups of columns.

Reads CSV (header row), Parquet (``pip install pyarrow``) or NPZ (one array per column; a 2-D
``[N, D]`` array counts as D columns). Modalities are named groups of columns, listed
(``modalities``) or by prefix (``modality_prefixes``); the label column holds strings or
integers. The class list is fixed when the data is first read and written into the run's
``config.yaml`` (``classes``), so ``mmlearn test``/``predict`` from that config map labels the same
way and predictions are written with their class names. The file is your own: there is nothing
to fetch (a missing file is an error naming ``data.path``). :func:`write_table` writes a
miniature.

``mmlearn predict`` serves the ``predict_split`` (the test split by default) or, with
``predict_path``, another file with the same feature columns, whose labels may be absent (a
file to label); it is standardised and imputed with the training split's statistics. Each
prediction is named by the row's ``id_column`` value, or by its row number in the file.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmlearn.data.base import (
    SPLITS,
    UNKNOWN,
    MultimodalDataModule,
    Split,
    standardize,
    stratified_split,
)
from mmlearn.data.paths import PathArg
from mmlearn.errors import MMLearnError

DEFAULT_ID = "id"
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MISSING = {"", "na", "nan", "null", "none", "?"}


def read_columns(path: Path) -> dict[str, np.ndarray]:
    """Column name -> 1-D array (numbers as float64 where every value parses, else str)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        cols: dict[str, np.ndarray] = {}
        names: list[str] = []
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                arr = z[key]
                if arr.ndim == 1:
                    cols[key] = arr
                elif arr.ndim == 2:
                    cols |= {f"{key}_{j}": arr[:, j] for j in range(arr.shape[1])}
                else:
                    raise MMLearnError(
                        f"{path}: array {key!r} has shape {arr.shape}; expected 1-D "
                        "(a column) or 2-D [N, D] (D columns)"
                    )
                names += [key] if arr.ndim == 1 else [f"{key}_{j}" for j in range(arr.shape[1])]
        _refuse_duplicates(path, names, " (a 2-D array K of D columns is K_0..K_{D-1})")
        return cols
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise MMLearnError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from e
        _refuse_duplicates(path, list(pq.read_schema(path).names))
        table = pq.read_table(path).to_pydict()
        return {k: _column(v) for k, v in table.items()}
    if suffix in (".csv", ".tsv", ".txt"):
        with open(path, newline="") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = next(reader, None)
            if not header:
                raise MMLearnError(f"{path}: empty file; expected a header row of column names")
            _refuse_duplicates(path, header)
            rows = list(reader)
        for i, row in enumerate(rows):
            if len(row) != len(header):
                raise MMLearnError(
                    f"{path}: line {i + 2} has {len(row)} fields, the header {len(header)}"
                )
        return {name: _column([r[j] for r in rows]) for j, name in enumerate(header)}
    raise MMLearnError(
        f"{path}: unknown table format {suffix!r}; expected .csv, .tsv, .parquet or .npz"
    )


def _refuse_duplicates(path: Path, names: Sequence[str], hint: str = "") -> None:
    """Refuse a table in which a column name occurs more than once (a dict would keep one)."""
    seen: set[str] = set()
    dups: list[str] = []
    for name in names:
        if name in seen and name not in dups:
            dups.append(name)
        seen.add(name)
    if dups:
        counts = ", ".join(f"{d!r} ({list(names).count(d)} times)" for d in dups)
        raise MMLearnError(
            f"{path}: duplicated column names {counts}{hint}; every column needs its own name "
            "(rename the copies, or drop them)"
        )


def _column(values: Sequence[Any]) -> np.ndarray:
    """Floats (missing -> NaN) when every present value is a number, else strings."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and v.strip().lower() in MISSING):
            out[i] = math.nan
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            return np.array(["" if v is None else str(v) for v in values])
    return out


class TableDataModule(MultimodalDataModule):
    """Multi-modal classification from one table file.

    Args:
        path: ``.csv``/``.tsv`` (header row), ``.parquet`` or ``.npz``; in a config, relative to
            that file (on the command line, to the working directory).
        label_column: the column with the labels (strings or integers).
        modalities: modality name -> its columns, e.g. ``{clinical: [age, bmi], genes: [g1, g2]}``.
        modality_prefixes: modality name -> column prefix, e.g. ``{clinical: "clin_"}``
            (columns in file order). Give this or ``modalities``.
        split_column: optional column with ``train``/``val``/``test`` per row; else a split
            stratified by label with ``val_fraction``/``test_fraction`` and ``seed``.
        classes: the class list (label -> index = its position). ``None``: the sorted distinct
            labels of the file; the resolved list is saved in the run's config.
        standardize: standardise every feature with train mean/std (fitted on train only).
        missing: a missing feature value (empty, NaN, ``NA``...): ``error`` (names the row and
            column), ``mean`` (train mean of the column), ``zero``, or ``drop`` (the row).
        predict_split: the split ``mmlearn predict`` serves (``train``, ``val`` or ``test``),
            when there is no ``predict_path``.
        predict_path: a table file (like ``path``) that ``mmlearn predict`` serves instead: the
            same feature columns; the label column is optional (absent, or an empty cell: the
            target is unknown); no split column needed. Imputed (``missing``) and standardised
            with the statistics of ``path``'s training split.
        id_column: the column that names each row in ``predictions.csv``; ``id`` by default, and
            then only when the file has one; without it (or with ``null``) a row is named by its
            row number in the file (0: the first row after the header).
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        path: PathArg,
        label_column: str,
        modalities: dict[str, list[str]] | None = None,
        modality_prefixes: dict[str, str] | None = None,
        split_column: str | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        classes: list[str] | None = None,
        standardize: bool = True,
        missing: Literal["error", "mean", "zero", "drop"] = "error",
        predict_split: str = "test",
        predict_path: PathArg | None = None,
        id_column: str | None = DEFAULT_ID,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        modality_dropout: float | dict[str, float] = 0.0,
        modality_dropout_fill: str = "mean",
        train_fraction: float = 1.0,
    ) -> None:
        self.source = str(path)
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            predict_split=predict_split,
            modality_dropout=modality_dropout,
            modality_dropout_fill=modality_dropout_fill,
            train_fraction=train_fraction,
        )
        if (modalities is None) == (modality_prefixes is None):
            raise MMLearnError(
                "TableDataModule: give data.modalities (name -> columns) or "
                "data.modality_prefixes (name -> prefix), not both or neither"
            )
        self.path = Path(path)
        self.label_column, self.split_column = label_column, split_column
        self.modality_columns, self.modality_prefixes = modalities, modality_prefixes
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.classes = [str(c) for c in classes] if classes is not None else None
        self.do_standardize, self.missing = standardize, missing
        self.predict_path = Path(predict_path) if predict_path is not None else None
        self.id_column = id_column
        self.source = str(self.path)
        self._columns: dict[str, np.ndarray] | None = None
        self._rows: dict[str, torch.Tensor] | None = None  # file rows of each split
        self._predict: tuple[Split, list[str]] | None = None  # predict_path: samples, ids

    # ---- reading -----------------------------------------------------------------------------
    @property
    def columns(self) -> dict[str, np.ndarray]:
        if self._columns is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"TableDataModule: data.path {str(self.path)!r} not found")
            self._columns = read_columns(self.path)
            if self.label_column not in self._columns:
                raise MMLearnError(
                    f"{self.path}: no label column {self.label_column!r}; columns: "
                    f"{_some(self._columns)}"
                )
            if self.classes is None:
                self.classes = sorted(
                    {_label(v) for v in self._columns[self.label_column]}, key=_natural
                )
                self.classes = [c for c in self.classes if c != ""]
                if len(self.classes) < 2:
                    what = (
                        f"a single class, {self.classes[0]!r}"
                        if self.classes
                        else "no labels (every cell is empty)"
                    )
                    raise MMLearnError(
                        f"{self.path}: label column {self.label_column!r} has {what}; "
                        "classification needs at least 2 classes (is this the label column?)"
                    )
            elif len(self.classes) < 2:
                raise MMLearnError(
                    f"{self.path}: data.classes={self.classes} for label column "
                    f"{self.label_column!r}; classification needs at least 2 classes"
                )
        return self._columns

    def groups(self) -> dict[str, list[str]]:
        """Modality -> its columns, checked against the file."""
        cols = self.columns
        if self.modality_columns is not None:
            groups = {m: list(c) for m, c in self.modality_columns.items()}
        else:
            assert self.modality_prefixes is not None
            groups = {
                m: [c for c in cols if c.startswith(p) and c != self.label_column]
                for m, p in self.modality_prefixes.items()
            }
        for m, names in groups.items():
            if not names:
                raise MMLearnError(
                    f"{self.path}: modality {m!r} has no columns (prefix "
                    f"{(self.modality_prefixes or {}).get(m)!r}); columns: "
                    f"{_some(cols)}"
                )
            unknown = [c for c in names if c not in cols]
            if unknown:
                raise MMLearnError(
                    f"{self.path}: modality {m!r} names columns {unknown} that the "
                    f"file does not have; columns: {_some(cols)}"
                )
            clash = {c for c in (self.label_column, self.split_column) if c in names}
            if clash:
                raise MMLearnError(
                    f"{self.path}: modality {m!r} includes {sorted(clash)}, the "
                    "label or split column"
                )
            _check_numbers(self.path, cols, m, names)
        return groups

    @property
    def num_classes(self) -> int:
        _ = self.columns
        assert self.classes is not None
        return len(self.classes)

    # ---- splits ------------------------------------------------------------------------------
    def load_splits(self) -> dict[str, Split]:
        splits, _ = self._raw_splits()
        if self.do_standardize:
            standardize(splits)
        return splits

    def _targets(self, path: Path, cols: dict[str, np.ndarray], unknown_ok: bool) -> torch.Tensor:
        """Class indices of the label column; ``unknown_ok``: an empty cell is UNKNOWN."""
        assert self.classes is not None
        index = {c: i for i, c in enumerate(self.classes)}
        if unknown_ok:
            index[""] = UNKNOWN
        labels = [_label(v) for v in cols[self.label_column]]
        for row, lab in enumerate(labels):
            if lab not in index:
                what = "no label" if lab == "" else f"label {lab!r}"
                raise MMLearnError(
                    f"{path}: row {row} has {what}; known classes: {self.classes[:20]}"
                )
        return torch.tensor([index[lab] for lab in labels], dtype=torch.int64)

    def _features(
        self, path: Path, cols: dict[str, np.ndarray], groups: dict[str, list[str]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Modality -> ``[N, D]`` float32 (missing: NaN), and the rows ``missing`` keeps."""
        inputs = {
            m: torch.from_numpy(np.stack([cols[c].astype(np.float64) for c in names], 1)).float()
            for m, names in groups.items()
        }
        n = len(next(iter(cols.values()))) if cols else 0
        keep = torch.ones(n, dtype=torch.bool)
        for m, x in inputs.items():
            bad = ~torch.isfinite(x)
            if bad.any() and self.missing == "error":
                row, j = (int(v) for v in bad.nonzero()[0])
                raise MMLearnError(
                    f"{path}: row {row}, column {groups[m][j]!r} (modality "
                    f"{m!r}) is missing or not finite; set data.missing to mean, "
                    "zero or drop"
                )
            if self.missing == "drop":
                keep &= ~bad.any(1)
        return inputs, keep

    def _fill(self, split: Split, fills: dict[str, torch.Tensor]) -> None:
        for m, fill in fills.items():
            x = split.inputs[m]
            split.inputs[m] = torch.where(torch.isfinite(x), x, fill)

    def _raw_splits(self) -> tuple[dict[str, Split], dict[str, torch.Tensor]]:
        """The splits before standardisation, and the fill values of ``missing`` (mean/zero)."""
        cols, groups = self.columns, self.groups()
        target = self._targets(self.path, cols, unknown_ok=False)
        inputs, keep = self._features(self.path, cols, groups)
        idx = self._split_indices(target, keep)
        self._rows = idx
        splits = {s: Split({m: x[i] for m, x in inputs.items()}, target[i]) for s, i in idx.items()}
        fills: dict[str, torch.Tensor] = {}
        if self.missing in ("mean", "zero"):
            for m in inputs:
                train = splits["train"].inputs[m]
                fill = torch.nanmean(torch.where(torch.isfinite(train), train, torch.nan), 0)
                fills[m] = (
                    torch.nan_to_num(fill) if self.missing == "mean" else torch.zeros_like(fill)
                )
            for split in splits.values():
                self._fill(split, fills)
        return splits, fills

    # ---- what `mmlearn predict` serves --------------------------------------------------------
    def predict_data(self) -> Split:
        if self.predict_path is None:
            return super().predict_data()
        return self._predict_file()[0]

    def predict_ids(self) -> list[str]:
        """The id column's value of each predicted row, else its row number in the file."""
        if self.predict_path is not None:
            return self._predict_file()[1]
        split = self._check_predict_split()
        _ = self.splits
        assert self._rows is not None
        rows = self._rows[split]
        if split == "train" and self.train_indices is not None:  # train_fraction's rows only
            rows = rows[self.train_indices]
        return self._ids(self.path, self.columns, rows)

    def _ids(self, path: Path, cols: dict[str, np.ndarray], rows: torch.Tensor) -> list[str]:
        column = self.id_column
        if column is not None and column not in cols:
            if column != DEFAULT_ID:
                raise MMLearnError(
                    f"{path}: no id column {column!r} (data.id_column); columns: {_some(cols)}"
                )
            column = None
        if column is None:
            return [str(int(r)) for r in rows]
        values = cols[column]
        return [_label(values[int(r)]) for r in rows]

    def _predict_file(self) -> tuple[Split, list[str]]:
        """``predict_path`` read with the feature columns of ``path``, imputed and standardised
        with ``path``'s training statistics; its ids."""
        if self._predict is not None:
            return self._predict
        path = self.predict_path
        assert path is not None
        if not path.is_file():
            raise FileNotFoundError(f"TableDataModule: data.predict_path {str(path)!r} not found")
        groups = self.groups()  # the columns of the training file
        cols = read_columns(path)
        for m, names in groups.items():
            absent = [c for c in names if c not in cols]
            if absent:
                raise MMLearnError(
                    f"{path} (data.predict_path): no columns {absent} of modality {m!r}, which "
                    f"{self.path} has; columns: {_some(cols)}"
                )
            _check_numbers(path, cols, m, names)
        n = len(next(iter(cols.values())))
        if self.label_column in cols:
            target = self._targets(path, cols, unknown_ok=True)
        else:  # a file to label
            target = torch.full((n,), UNKNOWN, dtype=torch.int64)
        inputs, keep = self._features(path, cols, groups)
        rows = keep.nonzero().flatten()
        if len(rows) == 0:
            what = "has no rows" if n == 0 else f"has no row left after data.missing={self.missing}"
            raise MMLearnError(f"{path} (data.predict_path) {what}; nothing to predict")
        split = Split({m: x[rows] for m, x in inputs.items()}, target[rows])
        train, fills = self._raw_splits()
        self._fill(split, fills)
        if self.do_standardize:
            standardize({"train": train["train"], "predict": split})
        self._validate_split(f"predict ({path})", split, self.splits["train"], unknown_ok=True)
        self._predict = (split, self._ids(path, cols, rows))
        return self._predict

    def _split_indices(self, target: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.split_column is None:
            rows = keep.nonzero().flatten()
            idx = stratified_split(target[rows], self.val_fraction, self.test_fraction, self.seed)
            return {s: rows[i] for s, i in idx.items()}
        if self.split_column not in self.columns:
            raise MMLearnError(
                f"{self.path}: no split column {self.split_column!r}; columns: "
                f"{_some(self.columns)}"
            )
        names = [str(v).strip().lower() for v in self.columns[self.split_column]]
        for row, name in enumerate(names):
            if name not in SPLIT_NAMES:
                raise MMLearnError(
                    f"{self.path}: row {row} has split {name!r} in column "
                    f"{self.split_column!r}; expected one of {sorted(SPLIT_NAMES)}"
                )
        which = [SPLIT_NAMES[n] for n in names]
        return {
            s: torch.tensor(
                [i for i, w in enumerate(which) if w == s and keep[i]], dtype=torch.long
            )
            for s in SPLITS
        }


def _check_numbers(path: Path, cols: dict[str, np.ndarray], m: str, names: list[str]) -> None:
    """Refuse a feature column of text, naming the first row that is not a number."""
    text = [c for c in names if cols[c].dtype.kind not in "fiub"]
    if text:
        c = text[0]
        bad = next(i for i, v in enumerate(cols[c]) if not _is_number(v))
        raise MMLearnError(
            f"{path}: column {c!r} (modality {m!r}) row {bad} holds "
            f"{str(cols[c][bad])!r}; features must be numbers"
        )


def _label(v: object) -> str:
    """Labels as strings; integral floats (a numeric column) without the ``.0``."""
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else (str(int(v)) if float(v).is_integer() else str(v))
    return str(v).strip()


def _natural(s: str) -> tuple[int, float, str]:
    """Numbers in numeric order (2 before 10), then text."""
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)


def _is_number(v: object) -> bool:
    try:
        float(v)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return str(v).strip().lower() in MISSING


def _some(cols: dict[str, np.ndarray]) -> str:
    names = list(cols)
    return str(names[:12])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > 12 else "]")


# ---- the layout in miniature (tests, examples; the index is mmlearn.data.fixtures) ----------
TABLE_CLASSES = ("cat", "dog", "eel")


def table_rows(n: int = 240, seed: int = 0) -> tuple[list[str], list[list[object]]]:
    """Header and ``n`` rows: id, split, species (the label), clin_0..3, gene_0..2."""
    rng = np.random.default_rng(seed)
    header = [
        "id",
        "split",
        "species",
        *[f"clin_{j}" for j in range(4)],
        *[f"gene_{j}" for j in range(3)],
    ]
    rows: list[list[object]] = []
    for i in range(n):
        y = int(rng.integers(len(TABLE_CLASSES)))
        clin = rng.normal(size=4) + np.eye(4)[y] * 2.0
        gene = rng.normal(size=3) * 0.5 + np.eye(3)[y] * 1.5
        split = "train" if i % 10 < 7 else ("val" if i % 10 < 8 else "test")
        rows.append([f"s{i}", split, TABLE_CLASSES[y], *clin.round(5), *gene.round(5)])
    return header, rows


def write_table(path: str | Path, n: int = 240, seed: int = 0) -> Path:
    """Write :func:`table_rows` as CSV (``.csv``), Parquet (``.parquet``) or NPZ (``.npz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(n, seed)
    columns = {h: [r[j] for r in rows] for j, h in enumerate(header)}
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)
    elif path.suffix == ".npz":
        arrays = {
            k: np.asarray(v) for k, v in columns.items() if not k.startswith(("clin", "gene"))
        }
        arrays["clin"] = np.asarray([r[3:7] for r in rows], dtype=np.float64)  # 2-D: clin_0..3
        arrays["gene"] = np.asarray([r[7:10] for r in rows], dtype=np.float64)
        np.savez(str(path), **arrays)  # type: ignore[arg-type]
    else:
        raise ValueError(f"{path}: choose .csv, .parquet or .npz")
    return path
