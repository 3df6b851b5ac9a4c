"""``mmlearn slurm --dry-run``: the filled-in sbatch header (no Slurm needed)."""

from __future__ import annotations

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


def test_dry_run_sets_one_task_per_gpu_and_the_seed_array(monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main(["slurm", "experiments/mfeat/i2m2.yaml", "--nodes", "2", "--gpus", "4",
              "--seeds", "0", "1", "2", "--partition", "gpu", "--dry-run", "--",
              "--trainer.max_epochs=50"])  # fmt: skip
    assert done.value.code == 0
    out = capsys.readouterr().out
    h = header(out)
    assert (h["nodes"], h["ntasks-per-node"], h["gres"]) == ("2", "4", "gpu:4")
    assert (h["array"], h["partition"], h["signal"]) == ("0,1,2", "gpu", "SIGUSR1@90")
    assert '--seed_everything="$SLURM_ARRAY_TASK_ID"' in out  # the array script
    command = out.strip().splitlines()[-1]
    assert command.endswith("experiments/mfeat/i2m2.yaml --trainer.max_epochs=50")


def test_tasks_must_equal_gpus(monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main(["slurm", "experiments/mfeat/i2m2.yaml", "--gpus", "4", "--tasks-per-node", "2",
              "--dry-run"])  # fmt: skip
    assert done.value.code == 2
    assert "must be equal" in capsys.readouterr().err
