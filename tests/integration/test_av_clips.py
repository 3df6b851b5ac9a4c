"""AudioVisualClips on OGM-GE's layout in miniature: decoding, the cache, errors, strategies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import STRATEGIES  # noqa: I001  (tests/helpers.py)
from mmlearn.data import AudioVisualClips
from mmlearn.data.av_clips import ClipDecoder, RawClips
from mmlearn.data.fixtures import write_av_clips
from mmlearn.errors import MMLearnError

SMALL = {"image_size": 32, "num_frames": 2, "prepare_workers": 0, "num_workers": 0}
SMALL_ARGS = [f"--data.{k}={v}" for k, v in SMALL.items()]
SMALL_RESNET = {"name": "resnet18", "width": 8}
ENCODERS = "--model.encoders=" + json.dumps({"visual": SMALL_RESNET, "audio": SMALL_RESNET})


def test_decoding_and_the_cache_agree(tmp_path: Path) -> None:
    write_av_clips(tmp_path)
    dm = AudioVisualClips(root=str(tmp_path), seed=0, **SMALL)
    assert dm.input_shapes == {"visual": [2, 3, 32, 32], "audio": [1, 257, 188]}
    assert dm.classes == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # CREMA-D's order
    dm.prepare_data()
    meta = json.loads((dm.cache / "meta.json").read_text())
    listed = [r.split(",") for r in (tmp_path / "crema-d" / "test.csv").read_text().split()]
    assert meta["clips"]["test"] == [[c, dm.classes.index(y)] for c, y in listed]  # in order
    splits = dm.splits
    assert [len(splits[s].target) for s in ("train", "val", "test")] == [30, 6, 12]
    assert splits["train"].inputs["visual"].dtype == torch.uint8
    assert splits["train"].inputs["audio"].dtype == torch.float16
    # the cache holds exactly what decoding a clip gives
    clips = dm.clip_lists()["test"]
    raw, label = RawClips(dm.decoder, clips)[5]
    assert torch.equal(splits["test"].inputs["visual"][5], raw["visual"])
    assert torch.equal(splits["test"].inputs["audio"][5], raw["audio"])
    assert int(splits["test"].target[5]) == label
    # a 220 Hz * (c + 1) tone: the loudest frequency bin grows with the class
    peak = [int(splits["test"].inputs["audio"][i, 0].float().mean(1).argmax()) for i in range(6)]
    assert peak == sorted(peak) and peak[0] < peak[-1]


def test_stft_settings_give_ogm_ge_shape() -> None:
    assert ClipDecoder(Path(".")).shapes["audio"] == [1, 257, 188]  # 3 s at 22,050 Hz, hop 353


def test_cache_is_rebuilt_when_settings_change_and_checked_by_size(tmp_path: Path) -> None:
    write_av_clips(tmp_path)
    dm = AudioVisualClips(root=str(tmp_path), seed=0, **SMALL)
    dm.prepare_data()
    other = AudioVisualClips(root=str(tmp_path), seed=0, **{**SMALL, "image_size": 24})
    with pytest.raises(MMLearnError, match="built with other settings"):
        _ = other.splits
    other.prepare_data()
    assert other.splits["train"].inputs["visual"].shape[-1] == 24
    np.save(other.cache / "test_labels.npy", np.zeros(3, np.int64))  # changed behind our back
    with pytest.raises(MMLearnError, match=r"test_labels.npy: \d+ bytes, the manifest recorded"):
        _ = AudioVisualClips(root=str(tmp_path), seed=0, **{**SMALL, "image_size": 24}).splits


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s[1])
def test_every_strategy_fits(tmp_path: Path, run_cli, strategy) -> None:
    write_av_clips(tmp_path, n_train=24, n_test=6)
    cli = run_cli(
        "fit",
        *strategy,
        "--data",
        "AudioVisualClips",
        f"--data.root={tmp_path}",
        *SMALL_ARGS,
        "--data.val_fraction=0.25",
        "--data.batch_size=4",
        ENCODERS,
        "--trainer.fast_dev_run=true",
    )
    assert cli.trainer.global_step >= 1  # the batch produced an optimiser step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def _break(folder: Path, what: str) -> str:
    clip = "train_0003_FEA"
    if what == "frames":
        for p in (folder / "visual" / "Image-01-FPS" / clip).iterdir():
            p.unlink()
        return rf"clip '{clip}': no frames"
    if what == "image":
        (folder / "visual" / "Image-01-FPS" / clip / "frame_00000.jpg").write_bytes(b"not a jpeg")
        return rf"clip '{clip}': unreadable image .*frame_00000.jpg"
    if what == "audio":
        (folder / "audio" / f"{clip}.wav").write_bytes(b"RIFF....junk")
        return rf"{clip}.wav: unreadable WAV"
    if what == "label":
        (folder / "test.csv").write_text("test_0000_NEU,NEU\ntest_0001_HAP,BORED\n")
        return r"test.csv: clip 'test_0001_HAP' \(line 2\) has label 'BORED'"
    (folder / "test.csv").unlink()
    return r"clip list .*test.csv not found"


@pytest.mark.parametrize("what", ["frames", "image", "audio", "label", "split file"])
def test_bad_layouts_fail_before_training_naming_file_and_clip(tmp_path: Path, what) -> None:
    folder = write_av_clips(tmp_path)
    message = _break(folder, what)
    dm = AudioVisualClips(root=str(tmp_path), seed=0, **SMALL)
    with pytest.raises((MMLearnError, FileNotFoundError), match=message):
        dm.prepare_data()


def test_missing_clips_cannot_be_fetched_and_the_error_names_the_layout(tmp_path: Path) -> None:
    dm = AudioVisualClips(root=str(tmp_path), name="kinetics-sounds", **SMALL)
    assert dm.input_shapes == {"visual": [2, 3, 32, 32], "audio": [1, 257, 188]}  # no file read
    for step in (dm.prepare_data, lambda: dm.num_classes):
        with pytest.raises(FileNotFoundError) as err:
            step()
        message = str(err.value)
        assert str(tmp_path / "kinetics-sounds" / "train.csv") in message
        assert "cannot be fetched" in message and "visual/Image-01-FPS/<clip>/*.jpg" in message
    assert not (tmp_path / "kinetics-sounds").exists()  # a failed prepare leaves nothing behind
