"""TableDataModule on generated CSV / Parquet / NPZ files: the CLI path a new user takes first."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from helpers import STRATEGY_ARGS  # noqa: I001  (tests/helpers.py)
from mmlearn.data import TableDataModule
from mmlearn.data.fixtures import TABLE_CLASSES, write_table
from mmlearn.errors import MMLearnError

PREFIXES = '--data.modality_prefixes={"clinical": "clin_", "genes": "gene_"}'


def table_args(path: Path, *extra: str) -> list[str]:
    return [
        "--data",
        "TableDataModule",
        f"--data.path={path}",
        "--data.label_column=species",
        PREFIXES,
        *extra,
    ]


def test_fit_from_csv_then_predict_with_class_names(run_cli, tmp_path: Path) -> None:
    csv_path = write_table(tmp_path / "my.csv")
    cli = run_cli(
        "fit",
        "--model",
        "I2M2",
        *table_args(csv_path, "--data.split_column=split"),
        "--trainer.max_epochs=8",
        "--seed_everything=0",
    )
    assert cli.datamodule.input_shapes == {"clinical": [4], "genes": [3]}
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.8
    run = Path(cli.trainer.log_dir)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["init_args"]["classes"] == list(TABLE_CLASSES)  # saved with the run
    pred = run_cli(
        "predict",
        "--config",
        str(run / "config.yaml"),
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
    )
    with open(_predictions(pred)) as f:
        rows = list(csv.DictReader(f))
    with open(csv_path) as f:  # predict serves the test rows of the split column, in file order
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    assert [r["target"] for r in rows] == [r["species"] for r in test_rows]
    assert sum(r["pred"] == r["target"] for r in rows) / len(rows) > 0.8


def _predictions(cli) -> Path:
    from mmlearn.callbacks import PredictionWriter

    (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)]
    assert writer.path is not None
    return writer.path


def test_csv_parquet_and_npz_give_the_same_splits(tmp_path: Path) -> None:
    def splits(path: Path, **kw):
        dm = TableDataModule(str(path), "species", seed=3, **kw)
        return dm.splits

    groups = {"clinical": [f"clin_{j}" for j in range(4)], "genes": [f"gene_{j}" for j in range(3)]}
    ref = splits(write_table(tmp_path / "t.csv"), modalities=groups)
    prefixes = {"clinical": "clin_", "genes": "gene_"}
    for suffix in (".parquet", ".npz"):
        other = splits(write_table(tmp_path / f"t{suffix}"), modality_prefixes=prefixes)
        for s in ("train", "val", "test"):
            assert torch.equal(other[s].target, ref[s].target), suffix
            for m in ("clinical", "genes"):
                torch.testing.assert_close(other[s].inputs[m], ref[s].inputs[m])
    # stratified by label with the fractions; standardised with train statistics only
    sizes = [len(ref[s].target) for s in ("train", "val", "test")]
    assert sum(sizes) == 240 and abs(sizes[1] - 36) <= 2 and sizes[1] == sizes[2]
    assert ref["train"].inputs["clinical"].mean(0).abs().max() < 1e-5


@pytest.mark.parametrize("strategy", STRATEGY_ARGS.values(), ids=list(STRATEGY_ARGS))
def test_every_strategy_fits_on_a_table(strategy: list[str], run_cli, tmp_path: Path) -> None:
    args = ["fit", *strategy, *table_args(write_table(tmp_path / "t.csv"))]
    cli = run_cli(*args, "--trainer.fast_dev_run=true")
    assert cli.trainer.global_step >= 1  # the batch produced an optimiser step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_missing_values_policy(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.csv")
    text = path.read_text().splitlines()
    cells = text[5].split(",")
    cells[4] = ""  # row 4 (0-based data row), column clin_1
    text[5] = ",".join(cells)
    path.write_text("\n".join(text) + "\n")
    prefixes = {"clinical": "clin_", "genes": "gene_"}
    with pytest.raises(MMLearnError, match=r"row 4, column 'clin_1' .*missing"):
        _ = TableDataModule(str(path), "species", modality_prefixes=prefixes).splits
    dm = TableDataModule(str(path), "species", modality_prefixes=prefixes, missing="drop")
    assert sum(len(s.target) for s in dm.splits.values()) == 239
    # the hole is filled with 0 or the mean of clin_1 over the training rows (found by their
    # other raw cells; standardisation off so the served values are the file's)
    with open(path) as f:
        row4 = next(r for i, r in enumerate(csv.DictReader(f)) if i == 4)
    others = torch.tensor([float(row4[c]) for c in ("clin_0", "clin_2", "clin_3")])
    for policy in ("mean", "zero"):
        dm = TableDataModule(
            str(path), "species", modality_prefixes=prefixes, missing=policy, standardize=False
        )
        splits = dm.splits
        assert sum(len(s.target) for s in splits.values()) == 240
        clinical = {s: sp.inputs["clinical"] for s, sp in splits.items()}
        hits = {s: (x[:, [0, 2, 3]] == others).all(1) for s, x in clinical.items()}
        (where,) = [s for s, h in hits.items() if h.any()]
        filled = float(clinical[where][hits[where], 1])
        train = clinical["train"][~hits["train"], 1]  # the train rows that have clin_1
        assert filled == (0.0 if policy == "zero" else pytest.approx(float(train.mean()))), policy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modalities": {"a": ["clin_0", "nope"]}}, r"columns \['nope'\] that the file does not"),
        ({"modality_prefixes": {"a": "zzz_"}}, r"modality 'a' has no columns \(prefix 'zzz_'\)"),
        ({"modalities": {"a": ["clin_0", "id"]}}, r"column 'id' \(modality 'a'\) row 0 holds 's0'"),
        ({"modalities": {"a": ["clin_0"]}, "classes": ["cat", "dog"]}, r"row \d+ has label 'eel'"),
        (
            {"modalities": {"a": ["clin_0"]}, "split_column": "species"},
            r"row 0 has split 'eel' in column 'species'",
        ),
    ],
)
def test_bad_tables_name_the_file_row_and_column(tmp_path: Path, kwargs, message) -> None:
    path = write_table(tmp_path / "t.csv")
    with pytest.raises(MMLearnError, match=message) as err:
        _ = TableDataModule(str(path), "species", **kwargs).splits
    assert str(path) in str(err.value)


def test_unknown_label_column_and_file(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.csv")
    with pytest.raises(MMLearnError, match=r"no label column 'label'; columns: \['id', 'split'"):
        _ = TableDataModule(str(path), "label", modality_prefixes={"a": "clin_"}).num_classes
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        _ = (
            TableDataModule(str(tmp_path / "nope.csv"), "y", modality_prefixes={"a": "c"}).classes
            or 0
        )
        _ = TableDataModule(
            str(tmp_path / "nope.csv"), "y", modality_prefixes={"a": "c"}
        ).num_classes
