"""FashionMNISTViews: the IDX layout in miniature, the real Debian files, every strategy on both."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from helpers import STRATEGIES  # noqa: I001  (tests/helpers.py)
from mmlearn.data import FashionMNISTViews, prepare_fashion_mnist
from mmlearn.data.fashion import FILES
from mmlearn.data.fixtures import write_fashion_mnist
from mmlearn.errors import MMLearnError


@pytest.mark.parametrize("layout", ["halves", "left_right", "quadrants"])
def test_layouts_cut_each_image_into_views(tmp_path: Path, layout: str) -> None:
    write_fashion_mnist(tmp_path)
    dm = FashionMNISTViews(root=str(tmp_path), layout=layout, seed=0)
    shapes = dm.input_shapes
    expected = {"halves": [1, 14, 28], "left_right": [1, 28, 14], "quadrants": [1, 14, 14]}
    assert all(s == expected[layout] for s in shapes.values())
    names = {
        "halves": ["top", "bottom"],
        "left_right": ["left", "right"],
        "quadrants": ["top_left", "top_right", "bottom_left", "bottom_right"],
    }
    assert list(shapes) == names[layout]
    assert [len(dm.splits[s].target) for s in ("train", "val", "test")] == [270, 30, 100]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s[1])
def test_every_strategy_fits_on_the_fixture(tmp_path: Path, run_cli, strategy) -> None:
    write_fashion_mnist(tmp_path)
    cli = run_cli(
        "fit",
        *strategy,
        "--data",
        "FashionMNISTViews",
        f"--data.root={tmp_path}",
        "--trainer.fast_dev_run=true",
    )
    assert cli.trainer.global_step >= 1  # the batch produced an optimiser step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.model.modalities == ["top", "bottom"]


def test_the_fixture_is_learnable(tmp_path: Path, run_cli) -> None:
    write_fashion_mnist(tmp_path, n_train=600)
    cli = run_cli(
        "fit",
        "--model",
        "I2M2",
        "--data",
        "FashionMNISTViews",
        f"--data.root={tmp_path}",
        "--trainer.max_epochs=4",
        "--seed_everything=0",
    )
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.9


def test_bad_idx_files_are_named(tmp_path: Path) -> None:
    folder = write_fashion_mnist(tmp_path)
    labels = folder / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels, "rb") as f:
        raw = f.read()
    with gzip.open(labels, "wb") as f:
        f.write(raw[:-5])  # 5 labels short of the images
    with pytest.raises(MMLearnError, match=r"train-labels-idx1-ubyte.gz: header says \[300\]"):
        _ = FashionMNISTViews(root=str(tmp_path)).splits
    shutil.copyfile(folder / "t10k-images-idx3-ubyte.gz", labels)  # images where labels belong
    with pytest.raises(MMLearnError, match=r"train-labels-idx1-ubyte.gz: IDX magic 0x803"):
        _ = FashionMNISTViews(root=str(tmp_path)).splits
    labels.unlink()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        _ = FashionMNISTViews(root=str(tmp_path)).splits


def test_prepare_checks_the_manifest(tmp_path: Path) -> None:
    fake = write_fashion_mnist(tmp_path / "fake")
    with pytest.raises(
        MMLearnError, match=r"train-images-idx3-ubyte.gz: SHA-256 [0-9a-f]{64}, exp"
    ):
        prepare_fashion_mnist(str(tmp_path / "data"), str(fake))


def test_real_fashion_mnist(fashion_dir: Path, tmp_path: Path, run_cli) -> None:
    out = prepare_fashion_mnist(str(tmp_path), str(fashion_dir))
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    dm = FashionMNISTViews(root=str(tmp_path), seed=0)
    sizes = [len(dm.splits[s].target) for s in ("train", "val", "test")]
    assert sizes == [54000, 6000, 10000]
    assert dm.splits["val"].target.bincount().tolist() == [600] * 10
    # every strategy runs from the CLI on the real images (a slice of them, a few steps each)
    for strategy in STRATEGIES:
        cli = run_cli(
            "fit",
            *strategy,
            "--data",
            "FashionMNISTViews",
            f"--data.root={tmp_path}",
            "--data.limit_train=2000",
            "--data.limit_test=500",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=5",
            "--trainer.limit_val_batches=2",
            "--test_after_fit=true",
        )
        # micro accuracy over exactly the limit_test=500 test images: a count of 500ths
        correct = float(cli.trainer.callback_metrics["test/acc"]) * 500
        assert abs(correct - round(correct)) < 1e-3, (strategy, correct)


def test_prepare_data_copies_the_system_files_into_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the Debian folder present (here a miniature standing in for it, its hashes as the
    manifest), prepare_data fills a root that lacks the files; shapes are known before."""
    from mmlearn.data import fashion
    from mmlearn.data.manifest import sha256

    system = write_fashion_mnist(tmp_path / "system")
    monkeypatch.setattr(fashion, "SYSTEM_DIR", system)
    monkeypatch.setattr(fashion, "FILES", {n: sha256(system / n) for n in FILES})
    dm = FashionMNISTViews(root=str(tmp_path / "data"), layout="quadrants", seed=0)
    assert dm.input_shapes == {v: [1, 14, 14] for v in dm.modalities} and len(dm.modalities) == 4
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        _ = FashionMNISTViews(root=str(tmp_path / "data")).splits
    dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "data" / "fashion-mnist").iterdir()) == sorted(FILES)
    assert [len(dm.splits[s].target) for s in ("train", "val", "test")] == [270, 30, 100]
