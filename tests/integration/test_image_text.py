"""ImageText on a Food-101-style JSONL miniature: cache, tokens, errors, every strategy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import STRATEGIES  # noqa: I001  (tests/helpers.py)
from mmlearn.data import ImageText
from mmlearn.data.fixtures import IMAGE_TEXT_CLASSES, write_image_text
from mmlearn.errors import MMLearnError

# a tiny BERT over the MiniLM tokenizer's vocabulary: real tokens, a model that trains in ms
TINY = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
}
ENCODERS = "--model.encoders=" + json.dumps(
    {"text": {"name": "hf", "config": TINY}, "image": {"name": "cnn", "channels": [8, 16]}}
)
SMALL = [
    "--data.image_size=24",
    "--data.max_length=16",
    "--data.num_workers=0",
    "--data.prepare_workers=0",
    "--data.val_fraction=0.25",
]


def make(tmp_path: Path, **kw) -> ImageText:
    args = {"image_size": 24, "max_length": 16, "prepare_workers": 0, "num_workers": 0, "seed": 0}
    return ImageText(root=str(tmp_path), **{**args, **kw})


def fit_i2m2(run_cli, root: Path):
    """I2M2, 10 epochs at lr 0.01 on the miniature under ``root``."""
    return run_cli(
        "fit",
        "--model",
        "I2M2",
        "--data",
        "ImageText",
        f"--data.root={root}",
        *SMALL,
        ENCODERS,
        "--trainer.max_epochs=10",
        "--seed_everything=0",
        "--model.optimizer.init_args.lr=0.01",
    )


def test_cache_holds_images_and_minilm_tokens(tmp_path: Path) -> None:
    write_image_text(tmp_path)
    dm = make(tmp_path)
    assert dm.classes is None and dm.num_classes == 3 and dm.classes == sorted(IMAGE_TEXT_CLASSES)
    dm.prepare_data()
    splits = dm.splits
    assert [len(splits[s].target) for s in ("train", "val", "test")] == [33, 3, 12]
    assert splits["train"].inputs["image"].shape[1:] == (3, 24, 24)
    text = splits["test"].inputs["text"]
    assert text.dtype == torch.int64 and text.shape == (12, 16)
    assert int(text[0, 0]) == 101 and int(text[0, -1]) == 0  # [CLS] first, padding 0 last
    # the caption of test record 0 names its dish: its token is in the ids
    from mmlearn.data.image_text import load_tokenizer

    dish = IMAGE_TEXT_CLASSES[0]
    assert load_tokenizer("minilm").convert_tokens_to_ids(dish) in text[0].tolist()


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s[1])
def test_every_strategy_fits(tmp_path: Path, run_cli, strategy) -> None:
    write_image_text(tmp_path)
    cli = run_cli(
        "fit",
        *strategy,
        "--data",
        "ImageText",
        f"--data.root={tmp_path}",
        *SMALL,
        ENCODERS,
        "--trainer.fast_dev_run=true",
    )
    assert cli.trainer.global_step >= 1  # the batch produced an optimiser step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_the_miniature_is_learnable(tmp_path: Path, run_cli) -> None:
    write_image_text(tmp_path, n_train=90)
    cli = fit_i2m2(run_cli, tmp_path)
    metrics = {
        k: round(float(v), 3) for k, v in cli.trainer.callback_metrics.items() if "val/acc" in k
    }
    assert metrics["val/acc"] > 0.9 and metrics["val/acc/image"] > 0.5, metrics
    assert metrics["val/acc/text"] > 0.5, metrics  # chance is 1/3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"train.jsonl:2: not JSON"),
        ('{"image": "images/x.jpg", "text": "t"}', r"train.jsonl:2: keys \['label'\] missing"),
        (
            '{"image": "images/x.jpg", "text": "t", "label": ["pizza"]}',
            r"train.jsonl:1: label 'pizza'; this data has a list",
        ),
        (
            '{"image": "images/none.jpg", "text": "t", "label": "pizza"}',
            r"train.jsonl:2: image .*none.jpg not found",
        ),
        (
            '{"image": "train.jsonl", "text": "t", "label": "pizza"}',
            r"train.jsonl:2: unreadable image",
        ),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    folder = write_image_text(tmp_path)
    lines = (folder / "train.jsonl").read_text().splitlines()
    lines[1] = line
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MMLearnError, match=message):
        make(tmp_path).prepare_data()


def test_unknown_label_in_test(tmp_path: Path) -> None:
    folder = write_image_text(tmp_path)
    with open(folder / "test.jsonl", "a") as f:
        f.write(json.dumps({"image": "images/test_0000.jpg", "text": "x", "label": "sushi"}) + "\n")
    with pytest.raises(MMLearnError, match=r"test.jsonl:13: label 'sushi' is not among"):
        make(tmp_path).prepare_data()


def test_multilabel_records_train_sigmoid_heads_end_to_end(tmp_path: Path, run_cli) -> None:
    write_image_text(tmp_path, n_train=90, multilabel=True)
    dm = make(tmp_path)
    assert dm.multilabel and dm.num_classes == 3
    dm.prepare_data()
    target = dm.splits["train"].target
    assert target.dtype == torch.float32 and target.shape[1] == 3
    assert set(target.sum(1).tolist()) == {1.0, 2.0}  # one or two dishes per record
    cli = fit_i2m2(run_cli, tmp_path)
    assert cli.model.multilabel  # linked from the data
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.8  # per-label decisions
    run = Path(cli.trainer.log_dir)
    pred = run_cli(
        "predict",
        "--config",
        str(run / "config.yaml"),
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
    )
    from mmlearn.callbacks import PredictionWriter

    (writer,) = [c for c in pred.trainer.callbacks if isinstance(c, PredictionWriter)]
    rows = writer.path.read_text().splitlines()
    assert rows[0].startswith("id,pred,p_pizza") and rows[0].endswith(",target")
    assert any("|" in r.split(",")[-1] for r in rows[1:])  # two-label targets are written joined


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s[1])
def test_every_strategy_fits_multilabel(tmp_path: Path, run_cli, strategy) -> None:
    write_image_text(tmp_path, multilabel=True)
    cli = run_cli(
        "fit",
        *strategy,
        "--data",
        "ImageText",
        f"--data.root={tmp_path}",
        *SMALL,
        ENCODERS,
        "--trainer.fast_dev_run=true",
    )
    assert cli.trainer.global_step >= 1 and cli.model.multilabel
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_mixed_label_kinds_are_refused(tmp_path: Path) -> None:
    folder = write_image_text(tmp_path, multilabel=True)
    with open(folder / "test.jsonl", "a") as f:
        f.write(json.dumps({"image": "images/test_0000.jpg", "text": "x", "label": "pizza"}) + "\n")
    with pytest.raises(MMLearnError, match=r"test.jsonl:13: label 'pizza'; this data has a list"):
        make(tmp_path).prepare_data()
