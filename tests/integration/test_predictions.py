"""``predictions.csv`` names every sample with the right class, row by row, keyed by its id.

A table whose class names are neither alphabetical nor sorted in order of appearance ("zebra",
"apple", "mango"), so an index -> name shift anywhere (the class list, the saved config, the
prediction writer) gives some row a neighbour's name. One model is fitted for the module; each
test predicts with it: the test split, another split, a file without labels.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mmlearn.callbacks import PredictionWriter
from mmlearn.strategies import InterOnly

APPEARANCE = ["zebra", "apple", "mango"]  # the order the labels first appear in the file


def write_separable_table(path: Path, n: int = 90) -> list[dict[str, str]]:
    """Rows id, split, animal (label), a_0..a_2, b_0..b_1; class c has a_c = 4 (others ~0)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        y = i % 3 if i < 3 else int(rng.integers(3))  # zebra, apple, mango come first
        a = rng.normal(scale=0.2, size=3) + 4.0 * np.eye(3)[y]
        b = rng.normal(scale=0.2, size=2) + 2.0 * np.array([y == 1, y == 2])
        split = ("train", "train", "train", "val", "test")[i % 5]
        rows.append(
            {
                "id": f"s{i}",
                "split": split,
                "animal": APPEARANCE[y],
                **{f"a_{j}": f"{v:.4f}" for j, v in enumerate(a)},
                **{f"b_{j}": f"{v:.4f}" for j, v in enumerate(b)},
            }
        )
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


DATA = [
    "--data",
    "TableDataModule",
    "--data.label_column=animal",
    "--data.split_column=split",
    '--data.modality_prefixes={"a": "a_", "b": "b_"}',
    "--data.batch_size=16",  # 18 test rows: 2 batches
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """InterOnly fitted on the zoo table: its run folder, checkpoint, classes and source rows."""
    from mmlearn.cli import build_cli

    tmp = tmp_path_factory.mktemp("zoo")
    source = write_separable_table(tmp / "zoo.csv")
    seed = os.environ.get("PL_GLOBAL_SEED")
    fit = build_cli(
        [
            "fit", "--model", "InterOnly", *DATA, f"--data.path={tmp / 'zoo.csv'}",
            "--model.init_args.optimizer.init_args.lr=0.01", "--trainer.max_epochs=15",
            "--seed_everything=0", *_quiet(tmp / "runs"),
        ]
    )  # fmt: skip
    if seed is None:  # seed_everything sets it; leave the environment as it was
        os.environ.pop("PL_GLOBAL_SEED", None)
    run = Path(fit.trainer.log_dir)
    classes = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["classes"]
    yield SimpleNamespace(
        tmp=tmp, run=run, ckpt=run / "checkpoints" / "last.ckpt", classes=classes, source=source
    )


def _quiet(out: Path) -> list[str]:
    return [
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def predict(
    run_cli: Any, fitted: SimpleNamespace, *extra: str
) -> tuple[Path, list[dict[str, str]]]:
    """``mmlearn predict`` from the fitted run's config; the written file and its rows."""
    pred = run_cli(
        "predict", "--config", str(fitted.run / "config.yaml"), f"--ckpt_path={fitted.ckpt}",
        *extra,
    )  # fmt: skip
    (writer,) = [c for c in pred.trainer.callbacks if isinstance(c, PredictionWriter)]
    assert writer.path is not None
    with open(writer.path, newline="") as f:
        return writer.path, list(csv.DictReader(f))


def test_predictions_csv_names_each_row_with_its_own_class(
    run_cli: Any, fitted: SimpleNamespace
) -> None:
    source, classes, ckpt = fitted.source, fitted.classes, fitted.ckpt
    assert sorted(classes) == sorted(APPEARANCE) and classes != APPEARANCE
    _, rows = predict(run_cli, fitted)

    # predict reads the test split in file order, each row keyed by the file's id column
    test_rows = [r for r in source if r["split"] == "test"]
    assert len(rows) == len(test_rows) == 18
    assert list(rows[0]) == ["id", "pred", *[f"p_{c}" for c in classes], "target"]
    assert [r["id"] for r in rows] == [r["id"] for r in test_rows]
    assert [r["target"] for r in rows] == [r["animal"] for r in test_rows]
    # trivially separable: every prediction is the sample's own label
    assert [r["pred"] for r in rows] == [r["animal"] for r in test_rows]
    # the probability columns carry the same names: the predicted class has the largest one
    for r in rows:
        probs = {name: float(r[f"p_{name}"]) for name in classes}
        assert max(probs, key=probs.__getitem__) == r["pred"], r

    # independently: the checkpoint's model on the raw features, standardised with train stats
    model = InterOnly.load_from_checkpoint(ckpt, map_location="cpu").eval()
    train_rows = [r for r in source if r["split"] == "train"]
    inputs = {}
    for m, cols in {"a": ["a_0", "a_1", "a_2"], "b": ["b_0", "b_1"]}.items():
        train = torch.tensor([[float(r[c]) for c in cols] for r in train_rows])
        test = torch.tensor([[float(r[c]) for c in cols] for r in test_rows])
        inputs[m] = (test - train.mean(0)) / train.std(0)
    with torch.no_grad():
        index = model.predict_log_proba(model(inputs)).argmax(-1).tolist()
    assert [classes[i] for i in index] == [r["pred"] for r in rows]


def test_predict_split_val_serves_the_validation_rows(
    run_cli: Any, fitted: SimpleNamespace
) -> None:
    _, rows = predict(run_cli, fitted, "--data.init_args.predict_split=val")
    val_rows = [r for r in fitted.source if r["split"] == "val"]
    assert [r["id"] for r in rows] == [r["id"] for r in val_rows]
    assert [r["target"] for r in rows] == [r["animal"] for r in val_rows]
    assert [r["pred"] for r in rows] == [r["animal"] for r in val_rows]


def test_predict_a_file_without_labels_keyed_by_id_and_says_where(
    run_cli: Any, fitted: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file to label: no label, no split column; ids in the file's order (here: reversed)."""
    features = ["a_0", "a_1", "a_2", "b_0", "b_1"]
    chosen = [r for r in fitted.source if r["split"] != "train"][::-1]
    new = fitted.tmp / "unlabelled.csv"
    with open(new, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *features])
        w.writerows([[f"new-{r['id']}", *[r[c] for c in features]] for r in chosen])
    capsys.readouterr()
    path, rows = predict(run_cli, fitted, f"--data.init_args.predict_path={new}")
    assert [r["id"] for r in rows] == [f"new-{r['id']}" for r in chosen]
    assert [r["target"] for r in rows] == [""] * len(chosen)  # unknown
    assert [r["pred"] for r in rows] == [r["animal"] for r in chosen]  # standardised as in fit
    out = capsys.readouterr().out
    assert f"predictions: {len(chosen)} rows written to {path}" in out.splitlines()


def test_multihot_predictions_are_named_label_by_label(tmp_path: Path) -> None:
    """The writer alone, multi-label: each set bit k is named ``classes[k]``, joined by ``|``."""
    classes = ["zebra", "apple", "mango"]
    trainer = SimpleNamespace(
        world_size=1,
        global_rank=0,
        log_dir=str(tmp_path),
        datamodule=SimpleNamespace(classes=classes),
    )
    target = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    decided = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    probs = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.8, 0.7], [0.3, 0.2, 0.6]])
    writer = PredictionWriter()
    batches = [
        {"log_probs": probs[:2].log(), "pred": decided[:2], "target": target[:2]},
        {"log_probs": probs[2:].log(), "pred": decided[2:], "target": target[2:]},
    ]
    writer.write_on_epoch_end(trainer, None, batches, [])  # type: ignore[arg-type]
    assert writer.path == tmp_path / "predictions.csv"
    with open(writer.path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["0", "1", "2"]  # no ids: the position
    assert [(r["target"], r["pred"]) for r in rows] == [
        ("zebra|mango", "zebra"),
        ("apple", "apple|mango"),
        ("", "mango"),
    ]
    assert [float(rows[1][f"p_{c}"]) for c in classes] == [0.1, 0.8, 0.7]
