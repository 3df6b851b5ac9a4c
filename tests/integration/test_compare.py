"""``mmlearn compare``: real runs, the reports, collecting finished runs, separate processes."""

from __future__ import annotations

import csv
from pathlib import Path

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
