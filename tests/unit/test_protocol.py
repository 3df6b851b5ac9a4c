"""The training-protocol table of a comparison, from the runs' own configs."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmlearn.evaluation.protocol import describe, protocol


def run(
    tmp_path: Path,
    name: str,
    lr: float = 0.001,
    epochs: int = 6,
    batch: int = 64,
    views: tuple[str, ...] = ("pix", "fou"),
    strategy: str = "InterOnly",
    embed: int = 64,
) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    cfg = {
        "model": {
            "class_path": f"mmlearn.strategies.{strategy}",
            "init_args": {
                "optimizer": {
                    "class_path": "torch.optim.Adam",
                    "init_args": {"lr": lr, "weight_decay": 0.0001},
                },
                "lr_scheduler": None,
                "clip_grad_norm": 8.0,
                "embed_dim": embed,
                "encoders": None,
                "head_hidden": 128,
            },
        },
        "trainer": {"max_epochs": epochs, "max_steps": -1},
        "data": {
            "class_path": "mmlearn.data.MultipleFeatures",
            # the seed differs per run and the root per machine: neither is the data
            "init_args": {"batch_size": batch, "views": list(views), "seed": len(name)},
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return {"strategy": name.split("-")[0], "run_dir": str(folder)}


def test_a_matched_budget_is_stated_with_every_setting(tmp_path: Path) -> None:
    rows = [run(tmp_path, "A-0"), run(tmp_path, "A-1"), run(tmp_path, "B-0")]
    text, matched = protocol(rows, ["A", "B"])
    assert matched
    lines = text.splitlines()
    assert lines[0].startswith("| strategy | data | optimiser | schedule | max_epochs")
    # one line per strategy (its two seeds ran the same settings)
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in body] == ["| A", "| B"]
    assert (
        "| A | MultipleFeatures(views=['pix', 'fou']) | Adam(lr=0.001, weight_decay=0.0001) | "
        "none | 6 | -1 | 64 | 8.0 | 1 | default | 64 | 128 |"
    ) == body[0]
    assert "Budget matched" in text and "Hyper-parameter search: none" in text
    assert "Model settings that differ" not in text and "steps/batch:" not in text


def test_a_different_learning_rate_or_epochs_is_named_as_not_matched(tmp_path: Path) -> None:
    rows = [run(tmp_path, "A-0"), run(tmp_path, "B-0", lr=0.01, epochs=12)]
    text, matched = protocol(rows, ["A", "B"])
    assert not matched
    assert "**Budget NOT matched:** optimiser, max_epochs differ between strategies" in text
    # a strategy whose seeds differ lists each variant
    rows.append(run(tmp_path, "A-1", batch=32))
    text, matched = protocol(rows, ["A", "B"])
    assert sum(line.startswith("| A |") for line in text.splitlines()) == 2
    assert "batch_size" in text.split("NOT matched:** ")[1]


def test_describe_writes_class_specs_and_values() -> None:
    spec = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 3}}
    assert describe(spec) == "StepLR(step_size=3)"
    assert describe(None) == "none" and describe(5) == "5"
    # a resolved config lists every argument: only those off the class's defaults are shown
    adam = {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.0, "amsgrad": False}
    assert describe({"class_path": "torch.optim.Adam", "init_args": adam}) == "Adam(lr=0.01)"
    # the learning rate is always shown, even at the class's default
    assert describe({"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}) == (
        "Adam(lr=0.001)"
    )
    assert describe({"class_path": "no.such.Thing", "init_args": {"a": 1}}) == "Thing(a=1)"


def test_other_data_unmatches_and_model_settings_and_mla_steps_are_named(tmp_path: Path) -> None:
    rows = [run(tmp_path, "A-0"), run(tmp_path, "B-0", views=("fac", "fou"))]
    text, matched = protocol(rows, ["A", "B"])
    assert not matched and "**Budget NOT matched:** data differ" in text
    rows = [run(tmp_path, "C-0"), run(tmp_path, "D-0", strategy="MLA", embed=16)]
    text, matched = protocol(rows, ["C", "D"])
    assert matched  # a model's own settings and MLA's steps do not unmatch the budget
    assert "Model settings that differ between strategies: embed_dim" in text
    assert "| D | " in text and "| M (one per modality) |" in text
    assert "steps/batch: optimiser steps per batch (MLA: one per modality" in text
