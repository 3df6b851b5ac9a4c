"""MIMIC (MultiBench's im.pk) on a generated miniature: tasks, cleaning, errors, strategies."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from helpers import STRATEGIES  # noqa: I001  (tests/helpers.py)
from mmlearn.data import MIMIC, mimic
from mmlearn.data.fixtures import write_mimic
from mmlearn.errors import MMLearnError


def test_tasks_splits_and_cleaning(tmp_path: Path) -> None:
    path = write_mimic(tmp_path)
    mortality = MIMIC(str(path), task=-1, seed=0)
    assert mortality.input_shapes == {"static": [5], "timeseries": [24, 12]}
    assert mortality.num_classes == 6
    sizes = [len(mortality.splits[s].target) for s in ("train", "val", "test")]
    assert sizes == [240, 30, 30]
    everything = torch.cat([mortality.splits[s].target for s in ("train", "val", "test")])
    assert everything.bincount().tolist() == [50] * 6  # the first positive outcome column
    icd = MIMIC(str(path), task=0, seed=0)
    assert icd.num_classes == 2
    assert set(icd.splits["train"].target.tolist()) == {0, 1}
    # NaN/inf became 0 before standardising: admission 0 has static[1] NaN, admission 1 has
    # timeseries[3, 2] inf; find them by their other raw values, standardisation left out
    with open(path, "rb") as f:
        data = pickle.load(f)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mimic, "standardize", lambda splits: splits)
        raw = MIMIC(str(path), task=-1, seed=0).splits
    static = torch.cat([raw[s].inputs["static"] for s in ("train", "val", "test")])
    series = torch.cat([raw[s].inputs["timeseries"] for s in ("train", "val", "test")])
    source = torch.from_numpy(data["adm_features_all"]).float()
    (row0,) = (static[:, [0, 2, 3, 4]] == source[0, [0, 2, 3, 4]]).all(1).nonzero()[0]
    (row1,) = (static == source[1]).all(1).nonzero()[0]
    assert float(static[row0, 1]) == 0.0 and float(series[row1, 3, 2]) == 0.0


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s[1])
def test_every_strategy_fits(tmp_path: Path, run_cli, strategy) -> None:
    path = write_mimic(tmp_path)
    cli = run_cli(
        "fit", *strategy, "--data", "MIMIC", f"--data.path={path}", "--trainer.fast_dev_run=true"
    )
    assert cli.trainer.global_step >= 1  # the batch produced an optimiser step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_the_miniature_is_learnable(tmp_path: Path, run_cli) -> None:
    path = write_mimic(tmp_path, n=600)
    cli = run_cli(
        "fit",
        "--model",
        "I2M2",
        "--data",
        "MIMIC",
        f"--data.path={path}",
        "--trainer.max_epochs=8",
        "--seed_everything=0",
    )
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.8


def test_bad_pickles_are_named(tmp_path: Path) -> None:
    path = write_mimic(tmp_path)
    with open(path, "rb") as f:
        data = pickle.load(f)
    data["y_icd9"] = data["y_icd9"][:-3]
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(MMLearnError, match=r"im.pk: sample counts differ between keys"):
        _ = MIMIC(str(path)).splits
    del data["ep_tdata"]
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(MMLearnError, match=r"im.pk: key 'ep_tdata' missing"):
        _ = MIMIC(str(path)).splits
    path.write_bytes(b"not a pickle")
    with pytest.raises(MMLearnError, match=r"im.pk: not a readable pickle"):
        _ = MIMIC(str(path)).splits
    with pytest.raises(FileNotFoundError, match="PhysioNet"):
        _ = MIMIC(str(tmp_path / "none.pk")).splits
    with pytest.raises(MMLearnError, match=r"MIMIC.task=20"):
        MIMIC(str(path), task=20)


def test_the_default_path_is_under_the_data_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MMLEARN_DATA", str(tmp_path))
    dm = MIMIC()
    assert dm.path == tmp_path / "mimic" / "im.pk"
    dm.prepare_data()  # credentialed: nothing is fetched
    with pytest.raises(FileNotFoundError, match=r"im.pk not found; .* cannot be fetched"):
        _ = dm.splits
    write_mimic(tmp_path)
    assert MIMIC(seed=0).input_shapes == {"static": [5], "timeseries": [24, 12]}
