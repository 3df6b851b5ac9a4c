"""W&B logging against the real wandb library, offline (no account, nothing uploaded)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from mmlearn.cli import build_cli
from mmlearn.loggers import WandbLogger

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def no_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A machine with no W&B credentials and no mode chosen: the logger must go offline itself."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_offline_decision_and_slurm_run_id(no_account, monkeypatch, tmp_path) -> None:
    assert WandbLogger(save_dir=str(tmp_path))._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbLogger(save_dir=str(tmp_path))._offline is False
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit mode wins over the key
    assert WandbLogger(save_dir=str(tmp_path))._offline is True
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert WandbLogger(save_dir=str(tmp_path))._id == "4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert WandbLogger(save_dir=str(tmp_path))._id == "77_3"
    assert WandbLogger(save_dir=str(tmp_path), id="mine")._id == "mine"


def test_wandb_base_config_logs_an_offline_run(no_account, tmp_path) -> None:
    """fit + test with ``experiments/_base/wandb.yaml``: one offline W&B run with the nested config,
    the (dataset, strategy) group and the test metrics; the CSV run folder is unchanged."""
    run_dir = tmp_path / "run"
    cli = build_cli(
        [
            "fit",
            "--config",
            str(REPO / "experiments/synthetic/i2m2.yaml"),
            "--config",
            str(REPO / "experiments/_base/wandb.yaml"),
            f"--run_dir={run_dir}",
            "--trainer.max_epochs=2",
            "--test_after_fit=true",
            *QUIET,
        ]
    )
    (logger,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    run = logger.experiment
    try:
        assert run.offline
        assert run.group == "SyntheticMultimodal/I2M2"
        assert run.job_type == "fit"
        # the resolved config, nested, exactly as saved in the run folder
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert run.config["model"] == saved["model"]
        assert run.config["model"]["init_args"]["embed_dim"] == 64
        assert run.config["seed_everything"] == saved["seed_everything"] == 0
        test_acc = float(cli.trainer.callback_metrics["test/acc"])
        assert run.summary["test/acc"] == pytest.approx(test_acc)
        # the run is on disk, ready for `wandb sync`
        (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run.id}")
        assert (offline / f"run-{run.id}.wandb").stat().st_size > 0
    finally:
        run.finish()
    # the CSV logger still names the run folder and holds every metric
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test/acc"]) for r in rows if r.get("test/acc")] == [pytest.approx(test_acc)]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


#: what Slurm sets in a job it has requeued once (SLURM_RESTART_COUNT >= 1)
SLURM_REQUEUED = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_JOB_NAME": "mmlearn-run",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_RESTART_COUNT": "1",
}


def test_requeued_run_may_rewrite_its_identical_config_but_not_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [
        "fit",
        "--config",
        str(REPO / "experiments/synthetic/inter_only.yaml"),
        f"--run_dir={tmp_path / 'run'}",
        "--trainer.max_epochs=1",
        *QUIET,
    ]
    build_cli(args)
    with pytest.raises(RuntimeError, match=r"already holds a trained run.*--ckpt_path"):
        build_cli(args)  # the same command outside Slurm: refused, and says how to resume
    for key, value in SLURM_REQUEUED.items():
        monkeypatch.setenv(key, value)
    again = build_cli(args)  # the same job requeued by Slurm: resumed, nothing lost
    assert again.trainer.ckpt_path == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(RuntimeError, match=r"model.init_args.embed_dim \(64 there, 8 here\)"):
        build_cli([*args, "--model.init_args.embed_dim=8"])
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["embed_dim"] == 64


def test_compare_logs_every_run_and_the_comparison(no_account, tmp_path) -> None:
    from mmlearn.cli import main

    configs = [str(REPO / f"experiments/synthetic/{s}.yaml") for s in ("inter_only", "mimo")]
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as done:
        main(
            ["compare", *configs, "--out", str(out), "--wandb", "--evaluate"]
            + ["--set", "trainer.max_epochs=1"]
        )
    assert done.value.code == 0
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 3  # one per (strategy, seed) and one for the comparison table + plot
    for run in runs:
        assert any((out / "wandb" / run).glob("run-*.wandb"))
    assert (out / "comparison.png").is_file()
    # each run's evaluation went to its own W&B run, the summarised one to the compare run
    media = [out / "wandb" / run / "files" / "media" for run in runs]
    evaluated = [m for m in media if list(m.glob("table/evaluate/missing_*.table.json"))]
    assert len(evaluated) == 2
    (compare,) = [m for m in media if (m / "table" / "compare").is_dir()]
    assert list(compare.glob("table/compare/evaluation_summary_*.table.json"))
    assert list(compare.glob("images/compare/missing_heatmap_*.png"))


def test_evaluate_logs_its_tables_and_pngs_to_the_runs_wandb(no_account, tmp_path) -> None:
    """``mmlearn evaluate`` of a W&B run: an offline run of job type ``evaluate`` holding the
    missing-modality table and the reliability diagram."""
    from mmlearn.cli import main

    run_dir = tmp_path / "run"
    fit = ["fit", "--config", str(REPO / "experiments/synthetic/inter_only.yaml")]
    fit += ["--config", str(REPO / "experiments/_base/wandb.yaml"), f"--run_dir={run_dir}"]
    cli = build_cli([*fit, "--trainer.max_epochs=1", *QUIET])
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    before = set((run_dir / "wandb").glob("offline-run-*"))
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    assert done.value.code == 0
    import wandb

    assert wandb.run is None  # the command closed its W&B run
    (new,) = set((run_dir / "wandb").glob("offline-run-*")) - before
    media = new / "files" / "media"
    assert list(media.glob("table/evaluate/missing_*.table.json"))
    assert list(media.glob("images/evaluate/reliability_*.png"))
    assert (run_dir / "evaluate" / "last" / "evaluation.json").is_file()
