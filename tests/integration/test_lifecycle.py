"""A run's life: one folder with one history, checked checkpoints, stops that can be resumed.

A run folder is fitted, resumed (``fit --ckpt_path RUN/checkpoints/last.ckpt``, with or without
its config or ``--run_dir``), evaluated (``validate``/``test``/``predict`` write into it), refused
when another run would overwrite it, requeued by Slurm, stopped by SIGTERM or SIGINT (a real
``mmlearn fit`` subprocess) and resumed again: every time the history equals the uninterrupted
run's. Checkpoints of another strategy, other data or no checkpoint at all are one-line errors, and
the console says what matters. Synthetic data, a few epochs.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback

from mmlearn.cli import build_cli, main
from mmlearn.lightning_cli import MMLearnCLI
from mmlearn.run_folder import shown

HERE = Path(__file__).resolve().parent
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
DATA = [
    "--data=SyntheticMultimodal",
    "--data.n_train=128",
    "--data.n_val=64",
    "--data.n_test=64",
    "--data.batch_size=32",
]
SYN = ["--model=InterOnly", *DATA, "--seed_everything=7", "--trainer.log_every_n_steps=1"]


def fit(root: Path, epochs: int, *extra: str) -> MMLearnCLI:
    """``mmlearn fit`` of the synthetic run under ``root`` (``root/SyntheticMultimodal/...``)."""
    args = ["fit", *SYN, f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={root}"]
    return build_cli([*args, *QUIET, *extra])


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def user_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run ``mmlearn <args>``; it must end with one ``mmlearn: error:`` line and exit status 2."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("mmlearn: error:")]
    return line


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 4-epoch run every resumed run is compared with: its history, checkpoints, best."""
    cli = fit(tmp_path_factory.mktemp("uninterrupted"), 4)
    callback = cli.trainer.checkpoint_callback
    run = Path(cli.trainer.log_dir)
    return {
        "rows": rows(run),
        "checkpoints": names(run / "checkpoints"),
        "best": Path(callback.best_model_path).name,
        "score": float(callback.best_model_score),
        "weights": {k: v.clone() for k, v in cli.model.state_dict().items()},
    }


def assert_same_run(cli: MMLearnCLI, run: Path, uninterrupted: dict[str, Any]) -> None:
    """``run`` (fitted by ``cli``) holds the uninterrupted run: history, checkpoints, best."""
    assert rows(run) == uninterrupted["rows"]  # every epoch and step once, with the same values
    assert names(run / "checkpoints") == uninterrupted["checkpoints"]
    callback = cli.trainer.checkpoint_callback
    best = Path(callback.best_model_path)
    assert best.name == uninterrupted["best"]
    assert best.parent.resolve() == (run / "checkpoints").resolve()
    assert float(callback.best_model_score) == uninterrupted["score"]
    for key, value in uninterrupted["weights"].items():
        torch.testing.assert_close(cli.model.state_dict()[key], value, atol=1e-6, rtol=0)


RESUME_FORMS = {
    "ckpt_path only": lambda run: [],
    "with its config": lambda run: ["--config", str(run / "config.yaml")],
    "with its config and run_dir": lambda run: [
        "--config",
        str(run / "config.yaml"),
        f"--run_dir={run}",
    ],
}


@pytest.mark.parametrize("form", list(RESUME_FORMS))
def test_fit_from_last_ckpt_continues_the_run_in_its_own_folder(
    tmp_path: Path, uninterrupted: dict[str, Any], form: str
) -> None:
    run = Path(fit(tmp_path / "runs", 2).trainer.log_dir)
    last = run / "checkpoints" / "last.ckpt"
    resumed = build_cli(
        ["fit", *RESUME_FORMS[form](run), "--ckpt_path", str(last), "--trainer.max_epochs=4"]
        + [f"--trainer.default_root_dir={tmp_path / 'elsewhere'}", *QUIET]
    )
    assert Path(resumed.trainer.log_dir).resolve() == run.resolve()
    assert names(run.parent) == [run.name] and not (tmp_path / "elsewhere").exists()
    assert resumed.trainer.current_epoch == 4
    # one history (metrics.csv appended, each epoch once), "best" the best of the whole run
    assert_same_run(resumed, run, uninterrupted)


def test_a_resumed_run_drops_what_its_interrupted_run_logged_after_the_checkpoint(
    tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    run = Path(fit(tmp_path / "runs", 2).trainer.log_dir)
    snapshot = tmp_path / "checkpoints-after-epoch-1"
    shutil.copytree(run / "checkpoints", snapshot)
    # the run goes on and logs epoch 2, then dies before any epoch-2 checkpoint reaches the disk
    build_cli(
        ["fit", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")] + ["--trainer.max_epochs=3"]
    )
    assert {r["epoch"] for r in rows(run)} == {"0", "1", "2"}
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(snapshot, run / "checkpoints")
    # and its folder is moved: the checkpoints' own folder names are stale
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    last = moved / "checkpoints" / "last.ckpt"
    resumed = build_cli(["fit", "--ckpt_path", str(last), "--trainer.max_epochs=4"])
    assert_same_run(resumed, moved, uninterrupted)


def test_validate_test_and_predict_write_into_the_run_they_evaluate(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cli = fit(tmp_path, 1)
    run = Path(cli.trainer.log_dir)
    best = cli.trainer.checkpoint_callback.best_model_path
    fitted = rows(run)
    capfd.readouterr()
    build_cli(["validate", "--ckpt_path", best, *QUIET])  # no --config: the run's config.yaml
    build_cli(["test", "--ckpt_path", best, *QUIET])
    said = capfd.readouterr().out.splitlines()
    assert f"mmlearn: val metrics in {shown(run / 'validate' / 'metrics.csv')}" in said
    assert f"mmlearn: test metrics in {shown(run / 'test' / 'metrics.csv')}" in said
    last = str(run / "checkpoints" / "last.ckpt")
    build_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", last, *QUIET])
    assert names(run.parent) == [run.name]  # no version_1, version_2, ...
    assert rows(run) == fitted  # the fit's history stays as it was
    (tested,) = rows(run / "test")
    assert 0.5 < float(tested["test/acc"]) <= 1
    assert float(rows(run / "validate")[0]["val/acc"]) > 0.5
    for sub, ckpt in (("validate", best), ("test", best), ("predict", last)):
        assert f"ckpt_path: {ckpt}" in (run / f"{sub}-config.yaml").read_text(), sub
    with open(run / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 64
    assert (run / "config.yaml").read_text().count("ckpt_path: null") == 1  # the fit's, kept


def test_fitting_again_into_a_trained_run_is_refused_with_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["fit", *SYN, f"--run_dir={run}", "--trainer.max_epochs=1", *QUIET]
    main(args)
    before = digest(run)
    last = run / "checkpoints" / "last.ckpt"
    err = user_error(capsys, args)
    assert f"{run} already holds a trained run" in err
    assert f"mmlearn fit --ckpt_path {last}" in err and "another --run_dir" in err
    # a checkpoint of this run resumed into another folder: the history would be split
    other = tmp_path / "other"
    resume = ["fit", "--ckpt_path", str(last), f"--run_dir={other}", "--trainer.max_epochs=2"]
    err = user_error(capsys, resume)
    assert f"--ckpt_path {last} belongs to the run {run}, not to --run_dir {other}" in err
    assert digest(run) == before and not other.exists()


def test_another_config_in_an_existing_run_folder_names_the_folder_and_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["fit", *SYN, f"--run_dir={run}", "--trainer.max_epochs=1", *QUIET]
    main(args)
    before = digest(run)
    err = user_error(capsys, [*args, "--model.init_args.embed_dim=8", "--model.dropout=0.1"])
    assert f"{run} holds another run: its config.yaml differs in" in err
    assert "model.init_args.dropout (0.0 there, 0.1 here)" in err
    assert "model.init_args.embed_dim (128 there, 8 here)" in err
    assert "save_config_callback" not in err
    assert digest(run) == before


def test_a_slurm_requeue_resumes_the_run_in_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    args = ["fit", *SYN, f"--run_dir={run}", *QUIET]
    build_cli([*args, "--trainer.max_epochs=2"])
    # the same job again, requeued by Slurm (a node failed: no hpc checkpoint, last.ckpt)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NUM_NODES": "1"}
    slurm |= {"SLURM_JOB_NAME": "mmlearn-run", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_RESTART_COUNT": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    requeued = build_cli([*args, "--trainer.max_epochs=3"])
    assert requeued.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert requeued.trainer.current_epoch == 3
    assert "last-v1.ckpt" not in names(run / "checkpoints")
    epochs = [r["epoch"] for r in rows(run) if r.get("val/acc")]
    assert epochs == ["0", "1", "2"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An I2M2 run and an InterOnly run, one epoch each."""
    out = {}
    for model in ("I2M2", "InterOnly"):
        root = tmp_path_factory.mktemp(model)
        args = ["fit", f"--model={model}", *DATA, "--trainer.max_epochs=1"]
        out[model] = Path(
            build_cli([*args, f"--trainer.default_root_dir={root}", *QUIET]).trainer.log_dir
        )
    return out


# (options after the I2M2 run's config, whose checkpoint: the I2M2 run's or the InterOnly run's,
#  what the error says besides the checkpoint's file)
MISMATCH = {
    "strategy": ([], "InterOnly", ["holds a model of strategy InterOnly", "config asks for I2M2"]),
    "input shapes": (["--data.dim=8"], "I2M2", ["{'m0': [16], 'm1': [16]}", "{'m0': [8], "]),
    "class count": (["--data.num_classes=3"], "I2M2", ["has 2 classes", "has 3"]),
    "modalities": (
        ["--data.num_modalities=3"],
        "I2M2",
        ["modality mismatch", "['m0', 'm1', 'm2']", "built for ['m0', 'm1']"],
    ),
}


@pytest.mark.parametrize("case", list(MISMATCH))
def test_a_checkpoint_unlike_the_config_is_refused_before_its_weights_load(
    two_runs: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str
) -> None:
    extra, owner, expected = MISMATCH[case]
    ckpt = two_runs[owner] / "checkpoints" / "last.ckpt"
    config = ["--config", str(two_runs["I2M2"] / "config.yaml")]
    before = {name: digest(run) for name, run in two_runs.items()}
    err = user_error(capsys, ["test", *config, "--ckpt_path", str(ckpt), *extra, *QUIET])
    assert f"--ckpt_path {ckpt}:" in err
    for text in expected:
        assert text in err, text
    assert {name: digest(run) for name, run in two_runs.items()} == before


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint\n", "truncated"],
    ids=["empty", "garbage", "truncated"],
)
def test_an_unreadable_checkpoint_is_one_line_naming_the_file(
    two_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any
) -> None:
    run = two_runs["InterOnly"]
    if content == "truncated":
        content = (run / "checkpoints" / "last.ckpt").read_bytes()[:4096]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    err = user_error(
        capsys, ["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(bad)]
    )
    assert f"--ckpt_path {bad}: " in err and ("empty" in err or "not a checkpoint" in err)


@pytest.mark.parametrize(
    "bound", ["--trainer.max_epochs=0", "--trainer.max_epochs=-2", "--trainer.max_epochs=-1"]
)
def test_a_fit_that_cannot_train_or_never_ends_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bound: str
) -> None:
    err = user_error(capsys, ["fit", *SYN, f"--trainer.default_root_dir={tmp_path}", bound, *QUIET])
    assert bound.removeprefix("--") in err
    assert not tmp_path.exists() or not any(tmp_path.rglob("*.ckpt"))


class PauseAt(Callback):
    """Writes ``marker`` at ``step`` and waits there (up to ``timeout_s``) for a stop signal.

    So a test sends its signal at a known step, however fast or slow the machine.
    """

    def __init__(self, step: int, marker: str, timeout_s: float = 60.0) -> None:
        self.step, self.marker, self.timeout_s = step, marker, timeout_s

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).touch()
        deadline = time.monotonic() + self.timeout_s
        callback = trainer.checkpoint_callback
        while time.monotonic() < deadline and not trainer.received_sigterm:
            if getattr(callback, "stopping", None) is not None:
                return
            time.sleep(0.02)


# 256 samples in batches of 32: 8 steps an epoch; the signal comes at step 10 (in epoch 1)
SIGNALLED = [*SYN, "--data.n_train=256", "--trainer.max_epochs=3", *QUIET]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_fit_saves_a_resumable_checkpoint_and_exits_nonzero(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    run, marker = tmp_path / "run", tmp_path / "paused"
    pause = ["--trainer.callbacks+=test_lifecycle.PauseAt", "--trainer.callbacks.step=10"]
    pause.append(f"--trainer.callbacks.marker={marker}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "mmlearn", "fit", *SIGNALLED, f"--run_dir={run}", *pause]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=60)[1][-3000:] if proc.poll() else "slow"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == code, err[-3000:]
    assert f"stopped by {sig.name} at epoch 1, step 10; saved {last}" in err
    assert f"Resume with: mmlearn fit --ckpt_path {last}" in err
    assert torch.load(last, weights_only=False)["global_step"] == 10

    resumed = build_cli(["fit", "--ckpt_path", str(last)])  # in place, as the line says
    reference = build_cli(["fit", *SIGNALLED, f"--run_dir={tmp_path / 'reference'}"])
    assert resumed.trainer.global_step == reference.trainer.global_step == 24
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0)
    got, want = rows(run), rows(tmp_path / "reference")
    # every row once, in order; the values too, but for the epoch means of the interrupted
    # epoch's training metrics (Lightning checkpoints no running means: they cover its last part)
    assert [(r["epoch"], r["step"]) for r in got] == [(r["epoch"], r["step"]) for r in want]
    for a, b in zip(got, want, strict=True):
        if a["epoch"] == "1" and a.get("train/loss_epoch"):
            assert a.keys() == b.keys()
            continue
        assert a == b


def test_the_console_says_what_matters_and_fit_ends_with_the_best_checkpoint(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # no seed given (Lightning would warn), the progress bar and the model summary on
    args = ["fit", "--model=InterOnly", *DATA, f"--trainer.default_root_dir={tmp_path}"]
    with warnings.catch_warnings(record=True) as warned, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        cli = build_cli([*args, "--trainer.max_epochs=2"])
    out, err = capfd.readouterr()
    said = "\n".join([out, err, caplog.text, *(str(w.message) for w in warned)])
    for noise in ("Tip:", "litlogger", "No seed found", "FLOPs", "Flops"):
        assert noise not in said, noise
    assert "Total params" in said and "Seed set to 0" in said  # the summary and the seed stay
    bar = cli.trainer.progress_bar_callback
    assert bar is not None and "v_num" not in bar.get_metrics(cli.trainer, cli.model)
    run = tmp_path / "SyntheticMultimodal" / "InterOnly" / "version_0"
    callback = cli.trainer.checkpoint_callback
    score, best = float(callback.best_model_score), Path(callback.best_model_path)
    assert best.parent == run / "checkpoints"
    closing = out.strip().splitlines()[-1]
    assert closing == f"mmlearn: best val/acc {score:.4f} in {best}; run folder {run}"
