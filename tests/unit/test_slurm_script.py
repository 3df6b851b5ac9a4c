"""``mmlearn slurm --dry-run``: the filled-in sbatch header, written and printed (no Slurm)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from mmlearn.cli import main
from mmlearn.slurm import render

REPO = Path(__file__).resolve().parents[2]


def header(script: str) -> dict[str, str]:
    lines = [line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    return dict((*line.lstrip("-").split("=", 1), "")[:2] for line in lines)


def test_render_replaces_adds_and_removes_directives() -> None:
    script = "#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --time=01:00:00\n# note\nsrun x\n"
    out = render(script, {"nodes": "4", "gres": "gpu:8", "time": None})
    assert header(out) == {"nodes": "4", "gres": "gpu:8"}
    assert out.index("--gres") < out.index("srun x")  # Slurm stops reading at the first command


def test_dry_run_sets_one_task_per_gpu_and_the_seed_array(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main(["slurm", "experiments/mfeat/i2m2.yaml", "--nodes", "2", "--gpus", "4",
              "--seeds", "0", "1", "2", "--partition", "gpu", "--dry-run",
              "--runs", str(tmp_path), "--", "--trainer.max_epochs=50"])  # fmt: skip
    assert done.value.code == 0
    out = capsys.readouterr().out
    h = header(out)
    assert (h["nodes"], h["ntasks-per-node"], h["gres"]) == ("2", "4", "gpu:4")
    assert (h["array"], h["partition"], h["signal"]) == ("0,1,2", "gpu", "SIGUSR1@90")
    assert '--seed_everything="$SLURM_ARRAY_TASK_ID"' in out  # the array script
    command = out.strip().splitlines()[-1]
    assert command.endswith("experiments/mfeat/i2m2.yaml --trainer.max_epochs=50")


def test_dry_run_writes_the_script_its_command_submits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(REPO)
    runs = tmp_path / "my runs"  # a space: the printed command quotes it
    with pytest.raises(SystemExit) as done:
        main(["slurm", "experiments/mfeat/i2m2.yaml", "--gpus", "2", "--runs", str(runs),
              "--dry-run"])  # fmt: skip
    assert done.value.code == 0
    out = capsys.readouterr().out
    *_, said, command = out.strip().splitlines()
    words = shlex.split(command)
    script = Path(words[words.index("--parsable") + 1])
    assert script == runs / "slurm" / "mmlearn-i2m2.sbatch"
    assert script.is_file(), "the printed command submits a script that was not written"
    # the environment a real submission passes, so the printed command submits the same job
    env = dict(w.split("=", 1) for w in words[: words.index("sbatch")])
    assert env == {"MMLEARN_RUNS": str(runs), "MMLEARN_PYTHON": sys.executable}
    assert f"wrote {script} (not submitted)" in said
    assert out.startswith(script.read_text())  # the printed script is the written one
    assert header(script.read_text())["gres"] == "gpu:2"


def test_tasks_must_equal_gpus(monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main(["slurm", "experiments/mfeat/i2m2.yaml", "--gpus", "4", "--tasks-per-node", "2",
              "--dry-run"])  # fmt: skip
    assert done.value.code == 2
    assert "must be equal" in capsys.readouterr().err
