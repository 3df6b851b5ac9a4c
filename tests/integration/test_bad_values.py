"""Every user-facing mistake is one ``mmlearn: error:`` line: exit 2, no traceback, no run files.

One table of bad inputs (options, config files, data files, machines, output folders), each run
through :func:`mmlearn.cli.main` in-process; the message must name the bad value and where it came
from (the option key or the file). A few run as a real subprocess, where stderr is all there is.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mmlearn.cli import PROJECT_COMMANDS, main
from mmlearn.data.fixtures import write_table
from mmlearn.errors import MMLearnError, user_error

SYN = [
    "--data",
    "SyntheticMultimodal",
    "--data.n_train=32",
    "--data.n_val=16",
    "--data.n_test=16",
    "--data.batch_size=16",
]
#: what a run would need if nothing stopped it: one short epoch, quiet
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
FIT = ["fit", "--model", "InterOnly", *SYN, *SHORT]
TABLE = [
    "--data",
    "TableDataModule",
    "--data.path={tmp}/t.csv",
    "--data.label_column=species",
    '--data.modality_prefixes={"clinical": "clin_", "genes": "gene_"}',
]
NO_GPU = not torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    """``args`` ({tmp} is the test's folder), the texts the one error line must contain."""

    id: str
    args: list[str]
    expect: list[str]
    xfail: str | None = None
    skip: str | None = None
    setup: str | None = None  # name of a file maker below
    extra: list[str] = field(default_factory=list)


def _csv(tmp: Path, edit: dict[tuple[int, str], str] | None = None) -> Path:
    """The species table at ``tmp/t.csv``, with ``{(row, column): value}`` cells replaced."""
    path = write_table(tmp / "t.csv")
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    for (row, col), value in (edit or {}).items():
        cells = lines[row + 1].split(",")
        cells[header.index(col)] = value
        lines[row + 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


def _no_test_rows(tmp: Path) -> None:
    path = _csv(tmp)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line.replace(",test,", ",train,") for line in lines) + "\n")


SETUPS = {
    "table": lambda tmp: _csv(tmp),
    "table_nan": lambda tmp: _csv(tmp, {(4, "clin_1"): "nan"}),
    "table_no_test": _no_test_rows,
    "not_yaml": lambda tmp: (tmp / "bad.yaml").write_text("model: [InterOnly\n  - : x: y\n"),
    "not_mapping": lambda tmp: (tmp / "list.yaml").write_text("- fit\n- InterOnly\n"),
    "a_file": lambda tmp: (tmp / "afile").write_text("not a folder\n"),
    "a_dir": lambda tmp: (tmp / "cfgdir").mkdir(),
    "key_typo_in_file": lambda tmp: (tmp / "typo.yaml").write_text(
        "model: InterOnly\ndata: SyntheticMultimodal\ntrainer: {max_epohcs: 1}\n"
    ),
    "rank_in_file": lambda tmp: (tmp / "rank.yaml").write_text(
        "model:\n  class_path: InterOnly\n  init_args: {fusion: lrtf, fusion_rank: 0}\n"
        "data: SyntheticMultimodal\n"
    ),
}

CASES = [
    # ---- model values: checked in the constructors, before anything runs ------------------------
    Case(
        "encoder-hidden-negative",
        [*FIT, "--model.encoders={m0: {name: mlp, hidden: [-3]}}"],
        ["model.encoders.m0", "hidden", "-3"],
    ),
    Case(
        "fusion-rank-0",
        [*FIT, "--model.fusion=lrtf", "--model.fusion_rank=0"],
        ["model.fusion_rank=0", ">= 1"],
    ),
    Case("dropout-1.5", [*FIT, "--model.dropout=1.5"], ["model.dropout=1.5", "[0, 1)"]),
    Case("embed-dim-0", [*FIT, "--model.embed_dim=0"], ["model.embed_dim=0", ">= 1"]),
    Case("head-hidden-negative", [*FIT, "--model.head_hidden=-2"], ["model.head_hidden=-2"]),
    Case(
        "negative-lr",
        [*FIT, "--model.optimizer.lr=-1"],
        ["model.optimizer.init_args.lr=-1.0", "torch.optim.Adam", ">= 0"],
    ),
    Case(
        "negative-lr-sgd",
        [*FIT, "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=-0.5"],
        ["model.optimizer.init_args.lr=-0.5", "torch.optim.SGD"],
    ),
    Case("clip-grad-norm-negative", [*FIT, "--model.clip_grad_norm=-1"], ["clip_grad_norm=-1"]),
    # ---- the imbalance baselines' own options ----------------------------------------------------
    Case(
        "ogm-ge-hidden-head",
        ["fit", "--model", "OGMGE", "--model.head_hidden=64", *SYN, *SHORT],
        ["OGMGE: head_hidden=64", "LINEAR", "head_hidden: null"],
    ),
    Case(
        "ogm-ge-conv-on-mlp",
        ["fit", "--model", "OGMGE", "--model.modulate=conv", *SYN, *SHORT],
        ["modulate='conv'", "modality 'm0'", "modulate: weights"],
    ),
    Case(
        "mmpareto-gamma-0",
        ["fit", "--model", "MMPareto", "--model.gamma=0", *SYN, *SHORT],
        ["MMPareto: gamma=0.0", "> 0"],
    ),
    Case(
        "mla-alpha-base-2",
        ["fit", "--model", "MLA", "--model.alpha_base=2", *SYN, *SHORT],
        ["MLA: alpha_base=2.0", "0 < alpha_base < 1"],
    ),
    Case(
        "torchjd-unknown-aggregator",
        [
            "fit",
            "--model",
            "MultiObjective",
            "--model.rule",
            "TorchJD",
            "--model.rule.aggregator",
            "Nope",
            *SYN,
            *SHORT,
        ],
        ["unknown aggregator 'Nope'", "UPGrad", "PCGrad"],
    ),
    Case(
        # CAGrad's solver (cvxpy) is not in the torchjd extra: the install hint, in one line
        "torchjd-aggregator-without-its-solver",
        [
            "fit",
            "--model",
            "MultiObjective",
            "--model.rule",
            "TorchJD",
            "--model.rule.aggregator",
            "{class_path: torchjd.aggregation.CAGrad, init_args: {c: 0.5}}",
            *SYN,
            *SHORT,
        ],
        ["CAGrad needs an optional solver", "cvxpy", "pip install"],
    ),
    Case(
        "mla-accumulate-grad-batches",
        ["fit", "--model", "MLA", "--trainer.accumulate_grad_batches=2", *SYN, *SHORT],
        ["trainer.accumulate_grad_batches=2", "MLA", "manual optimisation", "batch_size"],
    ),
    Case(
        "unknown-fusion",
        [*FIT, "--model.fusion=film"],
        ["model.fusion", "'film'", "'concat'"],
    ),
    Case(
        "unknown-encoder",
        [*FIT, "--model.encoders={m0: {name: transformer9}}"],
        ["model.encoders.m0", "'transformer9'", "'mlp'"],
    ),
    Case(
        "unknown-encoder-option",
        [*FIT, "--model.encoders={m0: {name: mlp, hiden: [8]}}"],
        ["model.encoders.m0", "'hiden'", "'hidden'"],
    ),
    Case(
        "encoder-modality-not-in-data",
        [*FIT, "--model.encoders={audio: {name: mlp}}"],
        ["model.encoders", "'audio'", "['m0', 'm1']"],
    ),
    Case(
        "wrong-rank-encoder",
        [*FIT, "--model.encoders={m0: {name: gru}}"],
        ["model.encoders.m0", "'gru'", "[16]"],
    ),
    Case(
        "mimo-mu-0",
        ["fit", "--model", "MIMO", *SYN, *SHORT, "--model.mu=0"],
        ["MIMO", "mu=0", "> 0"],
    ),
    Case(
        "multiobjective-rule-not-a-rule",
        ["fit", "--model", "MultiObjective", *SYN, *SHORT, "--model.rule=NotARule"],
        ["model.init_args.rule", "NotARule", "MGDA"],
    ),
    Case(
        "microbatch-n-chunks-0",
        [
            "fit",
            "--model",
            "BOGC",
            *SYN,
            *SHORT,
            "--model.moments=Microbatch",
            "--model.moments.n_chunks=0",
        ],
        ["Microbatch", "n_chunks=0", ">= 2"],
    ),
    Case(
        "bad-value-in-a-config-file",
        ["fit", "--config", "{tmp}/rank.yaml", *SYN[2:], *SHORT],
        ["model.fusion_rank=0"],
        setup="rank_in_file",
    ),
    # ---- typos and types: jsonargparse, reduced to one line with the closest valid name ---------
    Case(
        "model-option-typo",
        [*FIT, "--model.fusoin=concat"],
        ["model.init_args.fusoin", "did you mean", "model.init_args.fusion"],
    ),
    Case(
        "trainer-option-typo",
        [*FIT, "--trainer.max_epohcs=3"],
        ["--trainer.max_epohcs", "did you mean", "--trainer.max_epochs"],
    ),
    Case(
        "data-option-typo",
        [*FIT, "--data.n_trian=3"],
        ["data.init_args.n_trian", "did you mean", "data.init_args.n_train"],
    ),
    Case(
        "optimizer-option-typo",
        [*FIT, "--model.optimizer.lrr=0.1"],
        ["model.init_args.optimizer.init_args.lrr", "did you mean", "lr"],
    ),
    Case(
        "config-file-key-typo",
        ["fit", "--config", "{tmp}/typo.yaml", *SYN[2:], *SHORT],
        ["trainer.max_epohcs", "{tmp}/typo.yaml", "did you mean trainer.max_epochs"],
        setup="key_typo_in_file",
    ),
    Case(
        "seed-everything-abc",
        [*FIT, "--seed_everything=abc"],
        ["seed_everything", "'abc'", "int"],
    ),
    Case(
        "max-epochs-abc",
        [*FIT, "--trainer.max_epochs=abc"],
        ["trainer.max_epochs", "'abc'", "int"],
    ),
    Case(
        "fusion-rank-abc",
        [*FIT, "--model.fusion_rank=abc"],
        ["model.init_args.fusion_rank", "'abc'", "int"],
    ),
    Case(
        "lr-abc",
        [*FIT, "--model.optimizer.lr=abc"],
        ["model.init_args.optimizer.init_args.lr", "'abc'", "float"],
    ),
    Case(
        "literal-choice",
        ["fit", "--model", "InterOnly", *TABLE, "--data.missing=bogus"],
        ["data.init_args.missing='bogus'", "one of ['error', 'mean', 'zero', 'drop']"],
    ),
    Case(
        "checkpoint-option-typo",
        [*FIT, "--checkpoint.monitr=val/acc"],
        ["--checkpoint.monitr", "did you mean --checkpoint.monitor"],
    ),
    Case("no-model", ["fit", *SYN], ["fit.model", "required"]),
    Case("unknown-command", ["fitt", "--model", "InterOnly"], ["'fitt'", "did you mean 'fit'"]),
    # ---- choices of class: the registries ------------------------------------------------------
    Case(
        "unknown-strategy",
        ["fit", "--model", "Fusionator", *SYN, *SHORT],
        ["unknown strategy 'Fusionator'", "--model", "'I2M2'"],
    ),
    Case(
        "unknown-data-module",
        ["fit", "--model", "I2M2", "--data", "Imagenet", *SHORT],
        ["unknown data module 'Imagenet'", "--data", "'MultipleFeatures'"],
    ),
    # ---- config files ---------------------------------------------------------------------------
    Case(
        "missing-config-file",
        ["fit", "--config", "{tmp}/nope.yaml"],
        ["{tmp}/nope.yaml", "does not exist"],
    ),
    Case(
        "config-not-yaml",
        ["fit", "--config", "{tmp}/bad.yaml"],
        ["{tmp}/bad.yaml", "YAML", "line 2"],
        setup="not_yaml",
    ),
    Case(
        "config-not-a-mapping",
        ["fit", "--config", "{tmp}/list.yaml"],
        ["{tmp}/list.yaml", "mapping"],
        setup="not_mapping",
    ),
    Case(
        "config-is-a-directory",
        ["fit", "--config", "{tmp}/cfgdir"],
        ["{tmp}/cfgdir", "directory"],
        setup="a_dir",
    ),
    # ---- data values --------------------------------------------------------------------------
    # found by an independent new-user check: a traceback (negative tensor size) before
    Case(
        "synthetic-negative-size",
        ["fit", "--model", "InterOnly", *SYN, *SHORT, "--data.n_train=-5"],
        ["data.n_train=-5", ">= 1"],
    ),
    Case(
        "synthetic-negative-noise",
        ["fit", "--model", "InterOnly", *SYN, *SHORT, "--data.noise=-1"],
        ["data.noise=[-1.0", ">= 0"],
    ),
    # found by the same check: "the following arguments are required" instead of the file
    Case(
        "missing-checkpoint-without-config",
        ["test", "--ckpt_path", "{tmp}/nowhere/last.ckpt"],
        ["--ckpt_path {tmp}/nowhere/last.ckpt", "no such file"],
    ),
    Case(
        "negative-batch-size",
        ["fit", "--model", "InterOnly", *SYN, *SHORT, "--data.batch_size=-3"],
        ["data.batch_size=-3", ">= 1"],
    ),
    Case(
        "num-workers-negative",
        [*FIT, "--data.num_workers=-1"],
        ["data.num_workers=-1", ">= 0"],
    ),
    Case(
        "table-nan-feature",
        ["fit", "--model", "InterOnly", *TABLE, *SHORT],
        ["{tmp}/t.csv", "row 4", "'clin_1'", "data.missing"],
        setup="table_nan",
    ),
    Case(
        "table-label-out-of-range",
        ["fit", "--model", "InterOnly", *TABLE, *SHORT, "--data.classes=[cat, dog]"],
        ["{tmp}/t.csv", "label 'eel'", "['cat', 'dog']"],
        setup="table",
    ),
    Case(
        "table-empty-split",
        ["fit", "--model", "InterOnly", *TABLE, "--data.split_column=split", *SHORT],
        ["'test'", "empty"],
        setup="table_no_test",
    ),
    # ---- the machine and the output folders -----------------------------------------------------
    Case(
        "accelerator-gpu-without-gpu",
        [*FIT, "--trainer.accelerator=gpu"],
        ["trainer.accelerator='gpu'", "available", "'cpu'"],
        skip=None if NO_GPU else "this machine has a GPU",
    ),
    Case(
        "accelerator-mps",
        [*FIT, "--trainer.accelerator=mps"],
        ["trainer.accelerator='mps'", "available", "'cpu'"],
    ),
    Case(
        "devices-0",
        [*FIT, "--trainer.devices=0"],
        ["trainer.devices='0'", "not a valid input"],
    ),
    Case(
        "root-dir-not-permitted",
        [*FIT, "--trainer.default_root_dir=/sys/mmlearn-test-run"],
        ["trainer.default_root_dir", "'/sys/mmlearn-test-run'", "not permitted"],
    ),
    Case(
        "root-dir-under-a-file",
        [*FIT, "--trainer.default_root_dir={tmp}/afile/runs"],
        ["trainer.default_root_dir", "{tmp}/afile", "Not a directory"],
        setup="a_file",
    ),
    Case(
        "run-dir-is-a-file",
        [*FIT, "--run_dir={tmp}/afile"],
        ["run_dir", "{tmp}/afile"],
        setup="a_file",
    ),
    Case(
        "root-dir-under-proc",
        [*FIT, "--trainer.default_root_dir=/proc/mmlearn-x"],
        ["trainer.default_root_dir", "'/proc/mmlearn-x'"],
    ),
]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _one_line(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run ``mmlearn <args>``; assert exit 2 and exactly one ``mmlearn: error:`` line on stderr."""
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert done.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mmlearn: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            id=c.id,
            marks=[
                *([pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []),
                *([pytest.mark.skip(reason=c.skip)] if c.skip else []),
            ],
        )
        for c in CASES
    ],
)
def test_a_bad_input_is_one_line_naming_it(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        SETUPS[case.setup](tmp_path)
    before = {p: p.read_bytes() for p in _files(tmp_path)}
    runs = tmp_path / "runs"
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    # every run under tmp_path/runs unless the case names its own folder (later options win)
    args = [args[0], f"--trainer.default_root_dir={runs}", *args[1:]] if args[0] == "fit" else args
    line = _one_line(capsys, args)
    for text in case.expect:
        assert text.replace("{tmp}", str(tmp_path)) in line, line
    # refused before training: no run folder, and the files that were there are untouched
    assert _files(runs) == []
    assert {p: p.read_bytes() for p in _files(tmp_path)} == before


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in _files(folder)
    }


def test_an_existing_run_folder_is_left_byte_identical(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: InterOnly\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(os.urandom(64))
    (run / "metrics.csv").write_text("epoch,val/acc\n0,0.5\n")
    before = _digest(run)
    for bad in ("--model.fusion_rank=0", "--model.dropout=-0.1", "--trainer.accelerator=mps"):
        line = _one_line(capsys, [*FIT, f"--run_dir={run}", bad])
        assert bad.split("=")[1] in line
        assert _digest(run) == before


def test_help_lists_every_command_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    commands = ["fit", "validate", "test", "predict", *PROJECT_COMMANDS]
    assert {"prepare", "compare", "slurm"} <= set(commands)
    for name in commands:
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [name]]
        assert len(line.split()) >= 3, line  # the name and a description on the same line


def test_no_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line(capsys, [])
    assert "fit" in line and "compare" in line


def test_help_print_config_and_a_normal_run_still_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0 and "--trainer.max_epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main([*FIT, "--model.fusion_rank=3", "--print_config"])
    assert done.value.code == 0 and "fusion_rank: 3" in capsys.readouterr().out
    main([*FIT, f"--trainer.default_root_dir={tmp_path}"])
    assert (tmp_path / "SyntheticMultimodal" / "InterOnly" / "version_0" / "config.yaml").is_file()


# ---- the real command: stderr is all the user sees -------------------------------------------
@pytest.mark.parametrize(
    ("args", "expect", "seeded"),
    [
        (["fit", "--config", "nope.yaml"], "nope.yaml", False),
        ([*FIT, "--model.fusoin=concat"], "model.init_args.fusion", False),
        ([*FIT, "--trainer.max_epochs=abc"], "trainer.max_epochs", False),
        # refused in the constructor, after Lightning has seeded (and logged that it did)
        ([*FIT, "--model.fusion_rank=0"], "model.fusion_rank=0", True),
    ],
    ids=["missing-config", "typo", "max-epochs-abc", "constructor-check"],
)
def test_the_console_command_prints_one_line(
    args: list[str], expect: str, seeded: bool, tmp_path: Path
) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "mmlearn", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    if seeded:  # Lightning's own "Seed set to 0" comes first; the error is still one line
        others = [ln for ln in lines if not ln.startswith("mmlearn: error: ")]
        assert others and all("seed" in ln.lower() for ln in others), done.stderr
        lines = lines[len(others) :]
    assert len(lines) == 1 and lines[0].startswith("mmlearn: error: "), done.stderr
    assert expect in lines[0]
    assert not (tmp_path / "runs").exists()


# ---- which error is reported ------------------------------------------------------------------
def test_user_error_prefers_the_outermost_mmlearn_error() -> None:
    inner = MMLearnError("mlp encoder: hidden=[-3]; expected a list of integers >= 1")
    inner.__cause__ = FileNotFoundError("unrelated.csv")
    outer = MMLearnError(f"model.encoders.m0: {inner}")
    outer.__cause__ = inner
    union = ValueError("Does not validate against any of the Union subtypes")  # jsonargparse's
    union.__cause__ = outer
    assert user_error(union) is outer  # the one with the context, not the innermost
    # without an MMLearnError: the outermost path error; a plain bug is not a user error
    lost = FileNotFoundError(2, "No such file or directory", "data.csv")
    wrapper = RuntimeError("while loading")
    wrapper.__cause__ = lost
    assert user_error(wrapper) is lost
    assert user_error(ValueError("a bug")) is None
    assert user_error(RuntimeError("a bug")) is None
