"""Every W&B sweep file, expanded with the W&B agent's own code and parsed by the mmlearn CLI.

``wandb agent`` builds a trial's command with ``create_sweep_command_args`` and replaces the
``${...}`` macros of the sweep's ``command:``; :func:`agent_command` does exactly that, so the
command tested here is the command a real agent runs.
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from mmlearn.cli import build_cli

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


def draw(name: str, spec: dict[str, Any], rng: random.Random) -> Any:
    """One value of a sweep parameter, as W&B's random search would draw it."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    dist = spec.get("distribution")
    lo, hi = spec["min"], spec["max"]
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "uniform" or (dist is None and isinstance(lo, float)):
        return rng.uniform(lo, hi)
    if dist == "int_uniform" or (dist is None and isinstance(lo, int)):
        return rng.randint(lo, hi)
    raise AssertionError(f"parameter {name!r}: distribution {dist!r} is not handled by this test")


def agent_command(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` runs for a trial with ``params`` (wandb_agent._command_run)."""
    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars |= {"interpreter": ["python"], "program": [sweep["program"]]}
    sweep_vars["env"] = ["/usr/bin/env"]
    command: list[str] = []
    for chunk in map(str, create_sweep_command(list(sweep["command"]))):
        is_macro = chunk.startswith("${") and chunk.endswith("}")
        command += (sweep_vars.get(chunk[2:-1]) or []) if is_macro else [chunk]
    return command


def load_class(path: str) -> Any:
    """The class a config's ``class_path`` names."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The agent runs from the repository root, where the sweep files' paths are relative to."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MMLEARN_DATA", str(request.getfixturevalue("mfeat_root")))


def test_sweep_files_exist_for_every_mfeat_strategy() -> None:
    strategies = {p.stem for p in (REPO / "experiments" / "mfeat").glob("*.yaml")}
    assert {p.stem.removeprefix("mfeat_") for p in SWEEPS} >= strategies | {"compare"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_expands_to_a_command_the_cli_accepts(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert (REPO / sweep["program"]).is_file()
    assert "${args}" in sweep["command"], "LightningCLI needs --key=value: use ${args}"
    assert sweep["metric"]["name"].startswith(("val/", "test/"))
    rng = random.Random(path.name)
    params = {k: draw(k, spec, rng) for k, spec in sweep["parameters"].items()}
    # the server may send the parameters in any order: every drawn value must win either way
    for order in (list(params), sorted(params, reverse=True)):
        command = agent_command(sweep, {k: params[k] for k in order})
        assert command[:3] == ["/usr/bin/env", "python", sweep["program"]]
        assert command[3] == "fit"
        cli = build_cli(command[4:], run=False)
        for key, value in params.items():
            if key == "config":
                strategy = yaml.safe_load(Path(value).read_text())["model"]["class_path"]
                assert cli.config["model.class_path"] == strategy, (path.name, order)
            else:
                assert cli.config[key] == value, (path.name, key, order)


def test_one_drawn_sweep_command_runs_end_to_end(tmp_path: Path) -> None:
    """A trial of the strategy-comparison sweep, run the way the agent runs it, W&B offline."""
    sweep = yaml.safe_load((REPO / "experiments/sweeps/mfeat_compare.yaml").read_text())
    rng = random.Random(0)
    params = {k: draw(k, spec, rng) for k, spec in sweep["parameters"].items()}
    run_dir = tmp_path / "trial"
    command = agent_command(sweep, params) + [
        f"--run_dir={run_dir}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
    ]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_RUN_ID="trial0", WANDB_SILENT="true")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python = .venv's
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed_everything"] == params["seed_everything"]
    strategy = yaml.safe_load(Path(params["config"]).read_text())["model"]["class_path"]
    assert saved["model"]["class_path"] == strategy
    with open(run_dir / "metrics.csv") as f:
        tested = [float(r["test/acc"]) for r in csv.DictReader(f) if r.get("test/acc")]
    assert len(tested) == 1  # --test_after_fit ran
    # and logged the best checkpoint's accuracy on the test split, recomputed here without Lightning
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    model = load_class(saved["model"]["class_path"]).load_from_checkpoint(best, map_location="cpu")
    data_args = dict(saved["data"]["init_args"])
    if data_args.get("seed") is None:  # the DataModule followed seed_everything
        data_args["seed"] = saved["seed_everything"]
    test = load_class(saved["data"]["class_path"])(**data_args).splits["test"]
    with torch.no_grad():
        pred = model.eval().predict_log_proba(model(test.inputs)).argmax(-1)
    assert tested[0] == pytest.approx(float((pred == test.target).double().mean()), abs=1e-6)
    (offline,) = (run_dir / "wandb").glob("offline-run-*-trial0")
    assert (offline / "run-trial0.wandb").stat().st_size > 0
