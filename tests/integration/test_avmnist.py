"""AVMNIST on MultiBench's layout in miniature: reading, prepare + manifest, errors, strategies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import STRATEGIES  # noqa: I001  (tests/helpers.py)
from mmlearn.cli import main
from mmlearn.data import AVMNIST
from mmlearn.data.fixtures import write_avmnist
from mmlearn.errors import MMLearnError


def test_layout_splits_and_compact_storage(tmp_path: Path) -> None:
    folder = write_avmnist(tmp_path)
    dm = AVMNIST(root=str(tmp_path), val_size=30)
    assert dm.input_shapes == {"image": [1, 28, 28], "audio": [1, 112, 112]}
    assert [len(dm.splits[s].target) for s in ("train", "val", "test")] == [120, 30, 50]
    # uint8 images stay uint8, float spectrograms are stored as float16 / 255
    image, audio = dm.splits["train"].inputs["image"], dm.splits["train"].inputs["audio"]
    assert image.dtype == torch.uint8 and audio.dtype == torch.float16
    raw_image = np.load(folder / "image" / "train_data.npy")[:120].reshape(-1, 1, 28, 28)
    raw_audio = np.load(folder / "audio" / "train_data.npy")[:120, None] / 255.0
    assert np.array_equal(image.numpy(), raw_image)
    assert np.abs(audio.double().numpy() - raw_audio).max() < 1e-3
    # on the device: uint8 -> / 255, float16 -> float32 (val: unshuffled, the val split's rows)
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert {x.dtype for x in batch.inputs.values()} == {torch.float32}
    val = dm.splits["val"].inputs
    assert torch.equal(batch.inputs["image"], val["image"][: batch.size].float() / 255)
    assert torch.equal(batch.inputs["audio"], val["audio"][: batch.size].float())


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s[1])
def test_every_strategy_fits(tmp_path: Path, run_cli, strategy) -> None:
    write_avmnist(tmp_path)
    cli = run_cli(
        "fit",
        *strategy,
        "--data",
        "AVMNIST",
        f"--data.root={tmp_path}",
        "--data.val_size=30",
        "--trainer.fast_dev_run=true",
    )
    assert cli.trainer.global_step >= 1  # the batch produced an optimiser step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_prepare_writes_a_manifest_that_loading_checks(tmp_path: Path, capsys) -> None:
    src = write_avmnist(tmp_path / "download")
    with pytest.raises(SystemExit) as done:
        main(["prepare", "avmnist", "--root", str(tmp_path / "data"), "--source", str(src)])
    assert done.value.code == 0
    folder = tmp_path / "data" / "avmnist"
    assert (folder / "MANIFEST.json").is_file()
    labels = folder / "test_labels.npy"
    np.save(labels, np.zeros(49, dtype=np.int64))  # replaced after prepare: 49 labels, not 50
    with pytest.raises(MMLearnError, match=r"test_labels.npy: \d+ bytes, the manifest recorded"):
        _ = AVMNIST(root=str(tmp_path / "data"), val_size=30).splits


@pytest.mark.parametrize(
    ("file", "array", "message"),
    [
        ("test_labels.npy", np.zeros(49, np.int64), r"test sample counts differ"),
        (
            "train_labels.npy",
            np.full(150, 10, np.int64),
            r"sample 0 has label 10, outside \[0, 10\)",
        ),
        ("audio/train_data.npy", np.zeros((150, 64, 64)), r"samples of shape \[64, 64\], expected"),
    ],
)
def test_bad_layouts_name_the_file(tmp_path: Path, file, array, message) -> None:
    folder = write_avmnist(tmp_path)
    np.save(folder / file, array)
    with pytest.raises(MMLearnError, match=message):
        _ = AVMNIST(root=str(tmp_path), val_size=30).splits
    (folder / file).unlink()
    with pytest.raises(FileNotFoundError, match="MultiBench"):
        _ = AVMNIST(root=str(tmp_path), val_size=30).splits


def test_prepare_again_rehashes_against_the_manifest(tmp_path: Path, capsys) -> None:
    write_avmnist(tmp_path)
    main_args = ["prepare", "avmnist", "--root", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(main_args)  # first time: records the manifest
    images = tmp_path / "avmnist" / "image" / "test_data.npy"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF  # same size, different content: only the hash can tell
    images.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as done:
        main(main_args)
    assert done.value.code == 2
    assert "test_data.npy: SHA-256" in capsys.readouterr().err


def test_missing_data_cannot_be_fetched_and_says_what_to_run(tmp_path: Path) -> None:
    dm = AVMNIST(root=str(tmp_path), val_size=30)
    dm.prepare_data()  # nothing to fetch: not redistributed
    assert not (tmp_path / "avmnist").exists()
    with pytest.raises(FileNotFoundError) as err:
        _ = dm.splits
    message = str(err.value)
    assert str(tmp_path / "avmnist") in message and "cannot be fetched" in message
    assert f"mmlearn prepare avmnist --root {tmp_path}" in message
