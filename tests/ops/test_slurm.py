"""``mmlearn slurm`` and experiments/slurm/*.sbatch on a real one-node Slurm started by the tests.

Jobs run ``mmlearn fit`` on CPU through ``srun``: to completion, with DDP over two tasks, and
through a preemption (SIGUSR1 -> Lightning's hpc checkpoint -> ``scontrol requeue`` -> resume).
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from slurm_cluster import local_slurm, missing  # tests/ops is on sys.path

from helpers import require  # noqa: I001  (tests/helpers.py)
from mmlearn.cli import build_cli, main

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "experiments/synthetic/inter_only.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    why = missing()
    require(why is None, f"no local Slurm for the Slurm tests: {why}")
    # not under pytest's tmp: munged needs every parent folder searchable by the munge user
    root = Path(tempfile.mkdtemp(prefix="mmlearn-slurm-"))
    root.chmod(0o755)
    try:
        with local_slurm(root) as env:
            yield env
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(slurm_env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Client environment of the local cluster; jobs submitted from the repo, runs under tmp."""
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    monkeypatch.chdir(REPO)
    return tmp_path / "runs"


def submit(runs: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as done:
        main(["slurm", "--runs", str(runs), "--cpus-per-task=1", "--time=00:10:00", *args])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    match = re.search(r"submitted job (\d+)", out)
    assert match, out
    return match.group(1)


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def wait_for(check, timeout: float, what: str, job: str, runs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    logs = "".join(p.read_text()[-3000:] for p in (runs / "slurm").glob("*.out"))
    pytest.fail(f"job {job}: {what} not reached in {timeout} s; {job_info(job)}\n{logs}")


def finished(job: str, runs: Path, timeout: float = 240) -> dict[str, str]:
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_for(lambda: job_info(job).get("JobState") in final, timeout, "the end", job, runs)
    info = job_info(job)
    if info["JobState"] != "COMPLETED":
        logs = "".join(p.read_text()[-4000:] for p in (runs / "slurm").glob("*.out"))
        slurmd = (Path(os.environ["SLURM_CONF"]).parent / "slurmd.log").read_text()[-1500:]
        out = Path(info["StdOut"]).read_text()[-3000:] if Path(info["StdOut"]).is_file() else ""
        pytest.fail(f"job {job} ended {info['JobState']}: {info}\n{out}\n{logs}\n{slurmd}")
    return info


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_sbatch_job_fits_and_its_metrics_are_read_back(cluster: Path, capsys) -> None:
    fit = ["--trainer.max_epochs=2", "--data.init_args.n_train=256", "--test_after_fit=true"]
    job = submit(cluster, capsys, CONFIG, "--", *fit)
    finished(job, cluster)
    run = cluster / "slurm" / f"mmlearn-inter_only-{job}"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows if r.get("val/acc")] == ["0", "1"]
    (test_acc,) = [float(r["test/acc"]) for r in rows if r.get("test/acc")]
    assert 0.5 < test_acc <= 1.0
    assert checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2 * math.ceil(256 / 64)
    assert (run / "config.yaml").is_file()


def test_two_task_srun_job_trains_with_ddp(cluster: Path, capsys) -> None:
    job = submit(cluster, capsys, CONFIG, "--tasks-per-node=2", "--",
                 "--trainer.max_epochs=2", "--data.init_args.n_train=256")  # fmt: skip
    info = finished(job, cluster)
    assert info["NumTasks"] == "2"
    run = cluster / "slurm" / f"mmlearn-inter_only-{job}"
    # each of the 2 ranks takes half of the 256 samples per epoch: 2 steps of 64, not 4
    assert checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2 * 2


def test_preempted_job_requeues_resumes_and_ends_like_an_uninterrupted_run(
    cluster: Path, capsys, tmp_path: Path
) -> None:
    fit = ["--trainer.max_epochs=12", "--data.init_args.n_train=4096"]
    job = submit(cluster, capsys, CONFIG, "--", *fit)
    run = cluster / "slurm" / f"mmlearn-inter_only-{job}"
    last = run / "checkpoints" / "last.ckpt"
    wait_for(last.is_file, 180, "a first epoch", job, cluster)
    # what a scheduler does before preempting (or 90 s before the time limit): SIGUSR1 to the steps
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for((run / "hpc_ckpt_1.ckpt").is_file, 60, "the hpc checkpoint", job, cluster)
    wait_for(lambda: job_info(job).get("Restarts") == "1", 60, "the requeue", job, cluster)
    interrupted_at = checkpoint(run / "hpc_ckpt_1.ckpt")["global_step"]
    # a requeued job waits ~2 min (BeginTime); release it now
    wait_for(lambda: job_info(job).get("JobState") == "PENDING", 60, "pending", job, cluster)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    finished(job, cluster)
    resumed = checkpoint(last)
    assert 0 < interrupted_at < resumed["global_step"]

    # the same fit without Slurm, uninterrupted
    ref = [f"--run_dir={tmp_path / 'ref'}", "--trainer.accelerator=cpu"]
    reference = build_cli(["fit", "--config", CONFIG, *fit, *ref, *QUIET])
    expected = checkpoint(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == expected["global_step"] == reference.trainer.global_step
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, atol=1e-5, rtol=1e-4)
