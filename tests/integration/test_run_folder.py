"""Where runs go (``--trainer.default_root_dir``), the epoch bound, and choosing from registries."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import wandb

from mmlearn.cli import CHOICES, build_cli, check_choices, main
from mmlearn.data import DATA_MODULES, MultimodalDataModule
from mmlearn.errors import MMLearnError
from mmlearn.run_folder import DEFAULT_MAX_EPOCHS
from mmlearn.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SYN = [
    "--data=SyntheticMultimodal",
    "--data.n_train=64",
    "--data.n_val=32",
    "--data.n_test=32",
    "--data.batch_size=32",
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_default_root_dir_decides_where_the_run_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CSV run folder, checkpoints and W&B files all land under the root; the cwd stays empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "elsewhere"
    wandb_cfg = REPO / "experiments" / "_base" / "wandb.yaml"
    try:
        main(
            ["fit", "--model=InterOnly", *SYN, f"--config={wandb_cfg}"]
            + [f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1", *QUIET]
        )
    finally:
        wandb.finish()  # a run left open would be reused by the next WandbLogger
    run = root / "SyntheticMultimodal" / "InterOnly" / "version_0"
    assert {"config.yaml", "metrics.csv", "checkpoints/last.ckpt"} <= _files(run)
    assert list((root / "wandb").glob("offline-run-*")), _files(root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_a_logger_save_dir_given_explicitly_still_wins(tmp_path: Path) -> None:
    root, mine = tmp_path / "root", tmp_path / "mine"
    cli = build_cli(
        ["fit", "--model=InterOnly", *SYN, f"--trainer.default_root_dir={root}"]
        + [f"--trainer.logger.init_args.save_dir={mine}", "--trainer.max_epochs=1", *QUIET]
    )
    assert Path(cli.trainer.log_dir) == mine / "SyntheticMultimodal" / "InterOnly" / "version_0"
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()
    assert not root.exists() or not any(root.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("options", "epochs", "steps"),
    [
        ([], DEFAULT_MAX_EPOCHS, -1),  # nothing bounds the run: the finite default
        (["--trainer.max_epochs=3"], 3, -1),
        # a step or time budget is not cut short by an epoch default
        (["--trainer.max_steps=7"], None, 7),
        (["--trainer.max_time=00:00:01:00"], None, -1),
    ],
)
def test_every_run_has_a_finite_bound(
    tmp_path: Path, options: list[str], epochs: int | None, steps: int
) -> None:
    cli = build_cli(
        ["--model=InterOnly", *SYN, f"--trainer.default_root_dir={tmp_path}", *options], run=False
    )
    # Lightning itself would turn "no bound at all" into 1000 epochs
    assert (cli.trainer.max_epochs, cli.trainer.max_steps) == (epochs, steps)


@pytest.mark.parametrize(
    "value",
    ["Fusionator", "mmlearn.strategies.Fusionator", "{class_path: Fusionator}"],
)
def test_an_unknown_strategy_lists_the_registry(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model", value, *SYN, f"--trainer.default_root_dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mmlearn: error: unknown strategy") and "(from --model)" in err
    assert str(sorted(STRATEGIES)) in err


def test_a_strategy_file_and_a_full_class_path_are_accepted(tmp_path: Path) -> None:
    spec = tmp_path / "model.yaml"
    spec.write_text("class_path: mmlearn.strategies.i2m2.I2M2\ninit_args: {embed_dim: 8}\n")
    for value in (str(spec), "mmlearn.strategies.I2M2", "I2M2"):
        cli = build_cli(
            ["--model", value, *SYN, f"--trainer.default_root_dir={tmp_path}"], run=False
        )
        assert type(cli.model).__name__ == "I2M2"


def test_the_cli_chooses_from_the_registries_the_tests_use() -> None:
    assert CHOICES["model"][0] is STRATEGIES and CHOICES["data"][0] is DATA_MODULES
    base = set(inspect.signature(MultimodalDataModule.__init__).parameters) - {"self"}
    for name, cls in DATA_MODULES.items():
        assert cls.__name__ == name and not getattr(cls, "__abstractmethods__", None)
        # every base option (batch_size, num_workers, seed, predict_split) reaches the CLI
        assert base <= set(inspect.signature(cls.__init__).parameters), name


def test_choices_inside_a_config_are_read_relative_to_it(tmp_path: Path) -> None:
    """``data: ../x.yaml`` in a config is a file beside it, as jsonargparse reads it."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "data.yaml").write_text("class_path: SyntheticMultimodal\n")
    (tmp_path / "bad.yaml").write_text("class_path: mmlearn.strategies.Fusionator\n")
    good = tmp_path / "exp" / "good.yaml"
    good.write_text("model: InterOnly\ndata: ../data.yaml\n")
    check_choices(["fit", "--config", str(good)])  # nothing raised
    bad = tmp_path / "exp" / "bad.yaml"
    bad.write_text("model: ../bad.yaml\ndata: ../data.yaml\n")
    with pytest.raises(MMLearnError, match=rf"'mmlearn.strategies.Fusionator' \(from {bad}"):
        check_choices(["fit", f"--config={bad}"])
