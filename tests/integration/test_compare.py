"""``mmlearn compare``: real runs, the reports, collecting finished runs, separate processes."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mmlearn.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [str(REPO / f"experiments/synthetic/{s}.yaml") for s in ("inter_only", "i2m2")]
SHORT = ["--set", "trainer.max_epochs=1", "--set", "data.init_args.n_train=256"]


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_run(rows: list[dict[str, str]]) -> dict[tuple[str, str], float]:
    return {(r["strategy"], r["seed"]): float(r["test/acc"]) for r in rows}


def test_compare_writes_tables_and_plot_and_collect_reads_them_back(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as done:
        main(["compare", *CONFIGS, "--seeds", "0", "1", "--out", str(out), *SHORT])
    assert done.value.code == 0
    results = read(out / "results.csv")
    assert {(r["strategy"], r["seed"]) for r in results} == {
        (s, seed) for s in ("inter_only", "i2m2") for seed in ("0", "1")
    }
    summary = read(out / "summary.csv")
    i2m2 = next(r for r in summary if r["strategy"] == "i2m2" and r["metric"] == "test/acc")
    accs = by_run(results)
    diffs = [accs[("i2m2", s)] - accs[("inter_only", s)] for s in ("0", "1")]
    assert float(i2m2["diff"]) == pytest.approx(sum(diffs) / 2)
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| i2m2 | 2 |" in (out / "summary.md").read_text()

    # the same runs, collected from disk with the baseline switched: same numbers
    again = tmp_path / "again"
    with pytest.raises(SystemExit):
        main(["compare", "--collect", str(out), "--baseline", "i2m2", "--out", str(again)])
    assert by_run(read(again / "results.csv")) == pytest.approx(accs)
    inter = next(r for r in read(again / "summary.csv") if r["strategy"] == "inter_only")
    assert float(inter["diff"]) == pytest.approx(-sum(diffs) / 2)


def test_separate_processes_give_the_same_results_as_one(tmp_path: Path) -> None:
    rows = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        with pytest.raises(SystemExit):
            main(
                [
                    "compare",
                    CONFIGS[1],
                    "--seeds",
                    "0",
                    "1",
                    "--jobs",
                    jobs,
                    "--out",
                    str(out),
                    *SHORT,
                ]
            )
        rows[jobs] = by_run(read(out / "results.csv"))
    assert rows["2"] == rows["1"]


def test_compare_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["compare", "--collect", str(tmp_path), "--out", str(tmp_path / "o")])
    assert done.value.code == 2
    assert "found no run with test metrics" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["compare", "nope.yaml", "--out", str(tmp_path / "o")])
    assert done.value.code == 2
    assert "'nope.yaml' does not exist" in capsys.readouterr().err


# ---- checks before the first run, progress, failures, stopping, missing metrics -------------

TINY_DATA = ["--set", "data.init_args.n_train=256", "--set", "data.init_args.n_val=128"]
TINY_DATA += ["--set", "data.init_args.n_test=128"]
TINY = ["--set", "trainer.max_epochs=1", *TINY_DATA]
SYNTHETIC_DATA = str(REPO / "data_modules/synthetic.yaml")
# parses and names known classes, so it passes every check; fails when fit makes the optimiser
BROKEN = f"""\
data: {SYNTHETIC_DATA}
model:
  class_path: mmlearn.strategies.InterOnly
  init_args:
    optimizer:
      class_path: torch.optim.Adam
      init_args: {{lr: -1.0}}
"""


def inter_only_with(tmp: Path, name: str, old: str = "", new: str = "") -> str:
    """A copy of the synthetic InterOnly config as ``tmp/name``, one line changed."""
    text = Path(CONFIGS[0]).read_text().replace("../../data_modules/synthetic.yaml", SYNTHETIC_DATA)
    assert old in text
    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_text(text.replace(old, new))
    return str(tmp / name)


def earlier(out: Path) -> bytes | None:
    """What the bad-input cases put at ``out`` (a file, or an earlier results.csv)."""
    for path in (out, out / "results.csv"):
        if path.is_file():
            return path.read_bytes()
    return None


def bad_input(case: str, tmp: Path, out: Path) -> tuple[list[str], str]:
    """The ``mmlearn compare`` arguments of one bad input, and the error it must print."""
    first = CONFIGS[0]
    if case == "second config missing":
        return [first, str(tmp / "nope.yaml")], r"config '.*nope\.yaml' does not exist"
    if case == "second config not YAML":
        (tmp / "bad.yaml").write_text("model: [InterOnly\n")
        return [first, str(tmp / "bad.yaml")], r"bad\.yaml' is not readable YAML"
    if case == "second config names an unknown strategy":
        bad = inter_only_with(tmp, "bad.yaml", "strategies.InterOnly", "strategies.NoSuch")
        return [first, bad], r"unknown strategy 'mmlearn\.strategies\.NoSuch'.*valid: \["
    if case == "second config names an unknown data module":
        (tmp / "bad.yaml").write_text("data: {class_path: NoSuchData}\nmodel: InterOnly\n")
        return [first, str(tmp / "bad.yaml")], r"unknown data module 'NoSuchData'"
    if case == "second config has a bad value":
        bad = inter_only_with(tmp, "bad.yaml", "embed_dim: 64", "embed_dim: wide")
        return [first, bad], r"bad\.yaml' \(with the --set options\): .*embed_dim.*wide"
    if case == "bad --set option":
        return [first, "--set", "model.init_args.embed_dim=wide"], r"embed_dim.*wide"
    if case == "two configs with one label":
        same = inter_only_with(tmp, "other/inter_only.yaml")
        return [first, same], r"share the label 'inter_only'"
    if case == "unknown baseline":
        return (
            [*CONFIGS, "--baseline", "i2m3"],
            r"--baseline 'i2m3' is not among the compared strategies \['inter_only', 'i2m2'\]",
        )
    if case == "not a test metric":
        return [*CONFIGS, "--metrics", "test/acc", "acc"], r"--metrics acc: not a test metric"
    if case == "seed given twice":
        return [first, "--seeds", "0", "0"], r"--seeds: \[0\] given twice"
    if case == "out is a file":
        out.write_text("")
        return [first], r"--out .*: exists and is not a folder"
    assert case == "out holds an earlier compare"
    out.mkdir()
    (out / "results.csv").write_text("strategy,seed,test/acc\nghost,0,0.5\n")
    return [first], r"holds an earlier compare's results\.csv: pass another --out, or --overwrite"


@pytest.mark.parametrize(
    "case",
    [
        "second config missing",
        "second config not YAML",
        "second config names an unknown strategy",
        "second config names an unknown data module",
        "second config has a bad value",
        "bad --set option",
        "two configs with one label",
        "unknown baseline",
        "not a test metric",
        "seed given twice",
        "out is a file",
        "out holds an earlier compare",
    ],
)
def test_bad_input_is_refused_before_the_first_run(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args, message = bad_input(case, tmp_path, out)
    before = earlier(out)
    with pytest.raises(SystemExit) as done:
        main(["compare", *args, "--out", str(out), *TINY])
    assert not list(out.glob("*/version_*"))  # nothing was trained
    assert earlier(out) == before  # an earlier compare's results are left as they were
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmlearn: error: ")
    assert re.search(message, err[0]), err[0]


def test_overwrite_replaces_the_reports_of_an_earlier_compare(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "results.csv").write_text("strategy,seed,test/acc\nghost,0,0.5\n")
    (out / "failures.csv").write_text("config,strategy,seed,error\nghost.yaml,ghost,0,boom\n")
    (out / "summary.md").write_text("ghost\n")
    with pytest.raises(SystemExit) as done:
        main(["compare", CONFIGS[0], "--out", str(out), "--overwrite", *TINY])
    assert done.value.code == 0
    assert [r["strategy"] for r in read(out / "results.csv")] == ["inter_only"]
    assert not (out / "failures.csv").exists()  # this compare had no failure
    assert "ghost" not in (out / "summary.md").read_text()


def test_each_finished_run_prints_a_line_and_is_in_results_csv_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmlearn.evaluation import compare

    out = tmp_path / "cmp"
    results = out / "results.csv"
    seen: list[list[str] | None] = []  # results.csv as each run starts
    real = compare.run_one

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append([r["strategy"] for r in read(results)] if results.exists() else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "run_one", spy)
    with pytest.raises(SystemExit) as done:
        main(["compare", *CONFIGS, "--out", str(out), *TINY])
    assert done.value.code == 0
    assert seen == [None, ["inter_only"]]  # the first run was on disk before the second began
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"mmlearn compare: 2 runs (2 configs x 1 seed), 1 at a time, into {out}"
    progress = [line for line in lines if line.startswith("[")]  # runs print lines of their own
    accs = by_run(read(results))
    for k, strategy in enumerate(("inter_only", "i2m2"), 1):
        folder = re.escape(str(out / strategy / "version_0"))
        acc = f"{accs[(strategy, '0')]:.4f}"
        line = rf"\[{k}/2\] {strategy} seed 0: test/acc {acc}  \d+\.\d s  {folder}"
        assert re.fullmatch(line, progress[k - 1]), progress


def test_a_failing_run_is_named_and_the_others_are_still_summarised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as done:
        main(["compare", CONFIGS[0], str(broken), "--out", str(out), *TINY])
    assert done.value.code == 1
    printed = capsys.readouterr().out
    # one line: the config, the seed and the error's message, whatever words wrap torch's
    line = (
        rf"\[2/2\] FAILED broken seed 0 \({re.escape(str(broken))}\): (.*Invalid learning rate.*)"
    )
    found = re.search(rf"^{line}  \(\d+\.\d s\)$", printed, re.MULTILINE)
    assert found, printed
    message = found[1]
    assert [r["strategy"] for r in read(out / "results.csv")] == ["inter_only"]
    (failure,) = read(out / "failures.csv")
    assert failure | {"wall_s": ""} == {
        "config": str(broken),
        "strategy": "broken",
        "seed": "0",
        "error": message,
        "wall_s": "",
    }
    assert "Traceback" in (out / "failures.log").read_text()
    summary = (out / "summary.md").read_text()
    assert "| inter_only | 1 |" in summary and "| broken | 0 | n/a |" in summary
    assert "**Failed runs** (1 of 2" in summary and f"| {broken} | 0 | {message} |" in summary
    assert f"| {broken} | 0 | {message} |" in printed


def test_a_metric_a_strategy_does_not_log_is_na_for_it(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as done:  # InterOnly has no unimodal experts: no test/acc/m0
        main(
            ["compare", *CONFIGS, "--out", str(out), "--metrics", "test/acc", "test/acc/m0", *TINY]
        )
    assert done.value.code == 0
    table = (out / "summary.md").read_text().split("**test/acc/m0**")[1].splitlines()
    assert table[4] == "| inter_only | 0 | n/a | n/a | n/a |  |  |  |"
    assert table[5].startswith("| i2m2 | 1 | ") and table[5].endswith("| no pairs |  |  |  |")
    entries = {(r["strategy"], r["metric"]) for r in read(out / "summary.csv")}
    assert ("i2m2", "test/acc/m0") in entries and ("inter_only", "test/acc/m0") not in entries
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, None for no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # a zombie is dead, not reaped


def _workers(parent: int) -> list[int]:
    """The multiprocessing workers started by ``parent`` (its spawned children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == parent:
            with contextlib.suppress(OSError):
                if b"spawn_main" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_compare_stops_its_workers(tmp_path: Path, signum: signal.Signals) -> None:
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "mmlearn", "compare", *CONFIGS, "--jobs", "2", "--out", str(out)]
    cmd += [*TINY, "--set", "trainer.max_epochs=10000"]  # far longer than the test waits
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "w") as o, open(stderr, "w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(list(out.glob("*/version_0/config.yaml"))) < 2:  # both runs are training
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        printed = stdout.read_text()
        workers = _workers(proc.pid)
        assert len(workers) == 2
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the whole group
        else:
            os.kill(proc.pid, signum)  # `kill PID`, a scheduler: the compare only
        code = proc.wait(timeout=60)
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)]
        assert printed.startswith("mmlearn compare: 2 runs")  # printed (flushed) at once
        assert code == 128 + signum
        assert f"stopped by {signum.name} after 0 of 2 runs" in stderr.read_text()
    finally:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_killed_compare_keeps_the_runs_that_finished(tmp_path: Path) -> None:
    long = inter_only_with(tmp_path, "long.yaml", "max_epochs: 30", "max_epochs: 10000")
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "mmlearn", "compare", CONFIGS[0], long, "--out", str(out)]
    cmd += TINY_DATA  # inter_only's own 30 epochs (a few seconds), then `long` trains on
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as e:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=e, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "long/version_0/config.yaml").exists():  # the second run is training
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the second run did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert [r["strategy"] for r in read(out / "results.csv")] == ["inter_only"]
        assert code == 128 + signal.SIGTERM
        assert "stopped by SIGTERM after 1 of 2 runs" in stderr.read_text()
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_collect_reads_a_run_tested_afterwards_with_mmlearn_test(tmp_path: Path) -> None:
    """``mmlearn test`` on a run's checkpoint writes RUN/test/metrics.csv; collect finds it."""
    from mmlearn.cli import build_cli

    run = tmp_path / "runs" / "one"
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    build_cli(
        ["fit", "--config", CONFIGS[0], f"--run_dir={run}", "--trainer.max_epochs=1"]
        + ["--data.init_args.n_train=256", *quiet]
    )
    tested = build_cli(["test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *quiet])
    acc = float(tested.trainer.callback_metrics["test/acc"])
    assert (run / "test" / "metrics.csv").is_file()
    out = tmp_path / "collected"
    with pytest.raises(SystemExit) as done:
        main(["compare", "--collect", str(tmp_path / "runs"), "--out", str(out)])
    assert done.value.code == 0
    (row,) = read(out / "results.csv")
    assert float(row["test/acc"]) == pytest.approx(acc) and row["strategy"] == "InterOnly"
