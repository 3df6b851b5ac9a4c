"""TableDataModule checks: duplicated column names, a single class, what ``predict`` serves."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from mmlearn.data import TableDataModule
from mmlearn.data.base import UNKNOWN
from mmlearn.data.fixtures import write_table
from mmlearn.errors import MMLearnError

PREFIXES = {"clinical": "clin_", "genes": "gene_"}


def write_csv(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- duplicated column names ---------------------------------------------------------------
def test_csv_with_duplicated_column_names_is_refused(tmp_path: Path) -> None:
    rows = [[f"s{i}", "cat" if i % 2 else "dog", i, 2 * i, 3 * i, 4 * i] for i in range(10)]
    path = write_csv(tmp_path / "dup.csv", ["id", "y", "a_0", "a_1", "a_0", "b_0"], rows)
    with pytest.raises(MMLearnError, match=r"duplicated column names 'a_0' \(2 times\)") as err:
        _ = TableDataModule(str(path), "y", modality_prefixes={"a": "a_", "b": "b_"}).splits
    assert str(path) in str(err.value)


def test_parquet_with_duplicated_column_names_is_refused(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    arrays = [pa.array(["cat", "dog"] * 3), pa.array([1.0] * 6), pa.array([2.0] * 6)]
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays(arrays, names=["y", "g", "g"]), path)
    with pytest.raises(MMLearnError, match=r"dup.parquet: duplicated column names 'g'"):
        _ = TableDataModule(str(path), "y", modalities={"a": ["g"]}).splits


def test_npz_whose_2d_array_repeats_a_column_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.npz"
    n = 40
    np.savez(path, y=np.array(["cat", "dog"] * 20), clin=np.ones((n, 2)), clin_1=np.zeros(n))
    with pytest.raises(MMLearnError, match=r"dup.npz: duplicated column names 'clin_1'"):
        _ = TableDataModule(str(path), "y", modality_prefixes={"a": "clin_"}).splits


# ---- a single class --------------------------------------------------------------------------
def test_single_class_label_column_names_file_column_and_class(tmp_path: Path) -> None:
    rows = [[f"s{i}", "eel", i, -i] for i in range(12)]
    path = write_csv(tmp_path / "one.csv", ["id", "species", "clin_0", "gene_0"], rows)
    dm = TableDataModule(str(path), "species", modality_prefixes=PREFIXES)
    with pytest.raises(MMLearnError) as err:
        _ = dm.num_classes
    message = str(err.value)
    assert str(path) in message and "'species'" in message and "'eel'" in message
    assert "single class" in message


def test_a_single_given_class_is_refused_too(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.csv")
    dm = TableDataModule(str(path), "species", modality_prefixes=PREFIXES, classes=["cat"])
    with pytest.raises(MMLearnError, match=r"t.csv: data.classes=\['cat'\] for label column"):
        _ = dm.num_classes


# ---- predict_split -----------------------------------------------------------------------------
def test_predict_split_must_be_a_split(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.csv")
    with pytest.raises(MMLearnError, match=r"predict_split='validation'; expected one of"):
        TableDataModule(
            str(path), "species", modality_prefixes=PREFIXES, predict_split="validation"
        )


def test_predict_split_and_ids_from_the_id_column_or_the_row(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.csv")
    source = read_rows(path)
    for split in ("train", "val", "test"):
        dm = TableDataModule(
            str(path), "species", modality_prefixes=PREFIXES, split_column="split",
            predict_split=split,
        )  # fmt: skip
        served = dm.predict_data()
        assert served is dm.splits[split]
        assert dm.predict_ids() == [r["id"] for r in source if r["split"] == split]
    # no id column: the row number in the file (0: the first row after the header)
    dm = TableDataModule(
        str(path), "species", modality_prefixes=PREFIXES, split_column="split", id_column=None,
        predict_split="val",
    )  # fmt: skip
    assert dm.predict_ids() == [str(i) for i, r in enumerate(source) if r["split"] == "val"]
    named = TableDataModule(str(path), "species", modality_prefixes=PREFIXES, id_column="pid")
    with pytest.raises(MMLearnError, match=r"t.csv: no id column 'pid' \(data.id_column\)"):
        named.predict_ids()


# ---- predict_path: a file without labels -----------------------------------------------------
def test_predict_path_without_labels_is_served_with_train_statistics(tmp_path: Path) -> None:
    train_path = write_table(tmp_path / "t.csv")
    source = read_rows(train_path)
    feature = [f"clin_{j}" for j in range(4)] + [f"gene_{j}" for j in range(3)]
    new = [["p7", *[r[c] for c in feature]] for r in source[:5]]
    new[2][1] = ""  # a missing clin_0: data.missing=mean imputes the TRAIN mean
    pred_path = write_csv(tmp_path / "new.csv", ["id", *feature], new)  # no label, no split

    dm = TableDataModule(
        str(train_path), "species", modality_prefixes=PREFIXES, split_column="split",
        predict_path=str(pred_path), missing="mean",
    )  # fmt: skip
    served = dm.predict_data()
    assert served.target.tolist() == [UNKNOWN] * 5
    assert dm.predict_ids() == ["p7"] * 5
    # standardised with the training split's mean and std: the same values the file's own rows
    # have when they are served in their split
    train = [r for r in source if r["split"] == "train"]
    x = torch.tensor([[float(r[c]) for c in feature[:4]] for r in train], dtype=torch.float32)
    mean, std = x.mean(0), x.std(0)
    raw = torch.tensor([[float(r[c]) for c in feature[:4]] for r in source[:5]])
    raw[2, 0] = mean[0]
    torch.testing.assert_close(served.inputs["clinical"], (raw - mean) / std)

    # an id-less file is keyed by its rows; a partly labelled one keeps the labels it has
    labelled = [[r["species"] if i % 2 else "", *[r[c] for c in feature]] for i, r in
                enumerate(source[:4])]  # fmt: skip
    part = write_csv(tmp_path / "part.csv", ["species", *feature], labelled)
    dm = TableDataModule(
        str(train_path), "species", modality_prefixes=PREFIXES, predict_path=str(part)
    )
    target = dm.predict_data().target.tolist()
    classes = dm.classes or []
    assert dm.predict_ids() == ["0", "1", "2", "3"]
    assert target == [
        UNKNOWN if i % 2 == 0 else classes.index(r["species"]) for i, r in enumerate(source[:4])
    ]


def test_predict_path_must_have_the_feature_columns(tmp_path: Path) -> None:
    train_path = write_table(tmp_path / "t.csv")
    bad = write_csv(tmp_path / "bad.csv", ["id", "clin_0", "clin_1"], [["a", 1, 2]])
    dm = TableDataModule(
        str(train_path), "species", modality_prefixes=PREFIXES, predict_path=str(bad)
    )
    with pytest.raises(MMLearnError, match=r"bad.csv \(data.predict_path\): no columns"):
        dm.predict_data()
