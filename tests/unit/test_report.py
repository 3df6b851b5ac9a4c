"""The comparison statistics, checked against hand computation and scipy."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from mmlearn.evaluation.report import markdown_table, summarise

A = [0.90, 0.92, 0.94]
B = [0.93, 0.95, 0.96]  # B - A = [0.03, 0.03, 0.02]


def rows(**by_strategy: list[float]) -> list[dict]:
    return [
        {"strategy": s, "seed": seed, "test/acc": v}
        for s, values in by_strategy.items()
        for seed, v in enumerate(values)
    ]


def test_interval_and_paired_test_numbers() -> None:
    (a, b) = summarise(rows(A=A, B=B), ["test/acc"], baseline="A")
    assert a["mean"] == pytest.approx(0.92) and a["std"] == pytest.approx(0.02)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t_{0.975, 2}
    assert (a["ci_low"], a["ci_high"]) == (pytest.approx(0.92 - half), pytest.approx(0.92 + half))
    assert "diff" not in a  # the baseline is not tested against itself
    assert b["diff"] == pytest.approx(0.08 / 3) and b["pairs"] == 3
    # paired by seed: exactly scipy's related-samples t-test, here t = 8 on 2 df
    assert b["p_ttest"] == pytest.approx(stats.ttest_rel(B, A).pvalue)
    assert b["p_ttest"] == pytest.approx(0.015268, abs=1e-5)
    assert b["p_wilcoxon"] == pytest.approx(0.25)  # 3 positive pairs: the smallest possible p
    assert b["diff_ci_low"] > 0  # a consistent gain: the interval of the difference excludes 0


def test_pairs_follow_seeds_not_positions() -> None:
    shuffled = rows(A=A, B=B)
    shuffled[3:] = shuffled[3:][::-1]  # B's runs listed in another order
    (_, b) = summarise(shuffled, ["test/acc"], baseline="A")
    assert b["diff"] == pytest.approx(0.08 / 3)
    assert b["p_ttest"] == pytest.approx(0.015268, abs=1e-5)


def test_one_seed_has_no_interval_and_no_p_value() -> None:
    (a, b) = summarise(rows(A=A[:1], B=B[:1]), ["test/acc"], baseline="A")
    assert a["std"] == 0.0 and math.isnan(a["ci_low"])
    assert math.isnan(b["p_ttest"]) and b["diff"] == pytest.approx(0.03)
    table = markdown_table([a, b], "A")
    assert "n/a" in table and "(baseline)" in table


def test_unknown_baseline_is_an_error_naming_the_strategies() -> None:
    with pytest.raises(ValueError, match=r"baseline 'C'.*\['A', 'B'\]"):
        summarise(rows(A=A, B=B), ["test/acc"], baseline="C")


def test_markdown_table_cells(tmp_path) -> None:
    summary = summarise(rows(A=A, B=B, C=[0.9]), ["test/acc"], baseline="A")
    table = markdown_table(summary, "A").splitlines()
    assert table[0] == "**test/acc** (mean ± std over seeds, 95% CI; paired by seed vs **A**)"
    assert table[1] == ""
    assert table[2].count("|") == 9 and table[3] == "|---|---|---|---|---|---|---|---|"
    a, b, c = ([cell.strip() for cell in line.strip("|").split("|")] for line in table[4:])
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    ci = f"[{0.92 - half:.4f}, {0.92 + half:.4f}]"
    assert a == ["A", "3", "0.9200 ± 0.0200", ci, "(baseline)", "", "", ""]
    d = [0.03, 0.03, 0.02]
    d_half = 4.302652729911275 * stats.tstd(d) / math.sqrt(3)
    d_mean = sum(d) / 3
    assert b[4] == f"{d_mean:+.4f} [{d_mean - d_half:.4f}, {d_mean + d_half:.4f}]"
    # Holm over the one strategy with a test (C has one pair): its own p
    p_t = f"{stats.ttest_rel(B, A).pvalue:.3f}"
    assert b[5:] == [p_t, p_t, "0.250"]
    # one seed: no interval, no test, one pair
    assert c[1] == "1" and c[3] == "[n/a, n/a]" and c[4].startswith("+0.0000 [n/a, n/a]")
    assert c[5] == "n/a"
    two = markdown_table(summarise(rows(A=A, B=B), ["test/acc", "test/f1"], "A"), "A")
    assert two.count("**test/acc**") == 1 and "**test/f1**" not in two  # no f1 values given


def test_csv_round_trip_keeps_every_key_in_first_seen_order(tmp_path) -> None:
    import csv

    from mmlearn.evaluation.report import write_csv

    path = tmp_path / "r.csv"
    write_csv(path, [{"a": 1, "b": 2}, {"b": 3, "c": 4}])
    with open(path, newline="") as f:
        got = list(csv.reader(f))
    assert got == [["a", "b", "c"], ["1", "2", ""], ["", "3", "4"]]


def test_two_seeds_give_an_interval_and_p_values() -> None:
    (a, b) = summarise(rows(A=A[:2], B=B[:2]), ["test/acc"], baseline="A")
    half = 12.706204736174707 * stats.tstd(A[:2]) / math.sqrt(2)  # t_{0.975, 1}
    assert a["ci_low"] == pytest.approx(0.91 - half) and a["ci_high"] == pytest.approx(0.91 + half)
    # both differences are 0.03: no spread, so the t-test's p (scipy: 1e-15) is not given
    assert stats.ttest_rel(B[:2], A[:2]).pvalue < 1e-10 and math.isnan(b["p_ttest"])
    assert b["p_wilcoxon"] == pytest.approx(0.5)
    (_, b) = summarise(rows(A=A[:2], B=[0.93, 0.96]), ["test/acc"], baseline="A")
    assert b["p_ttest"] == pytest.approx(stats.ttest_rel([0.93, 0.96], A[:2]).pvalue)


def test_one_nonzero_pair_has_no_p_value() -> None:
    (_, b) = summarise(rows(A=[0.5], B=[0.6]), ["test/acc"], baseline="A")
    assert b["diff"] == pytest.approx(0.1) and math.isnan(b["p_ttest"])
    assert math.isnan(b["p_wilcoxon"])


def test_a_strategy_without_shared_seeds_says_no_pairs() -> None:
    runs = rows(A=A) + [{"strategy": "C", "seed": 7, "test/acc": 0.5}]
    runs += [{"strategy": "D", "seed": 0, "test/f1": 0.7}]  # D has f1 only, C has no f1
    runs += [
        {"strategy": "A", "seed": 0, "test/f1": 0.8},
        {"strategy": "A", "seed": 1, "test/f1": 0.9},
    ]
    summary = summarise(runs, ["test/acc", "test/f1"], baseline="A")
    got = [(e["strategy"], e["metric"]) for e in summary]
    assert got == [("A", "test/acc"), ("C", "test/acc"), ("A", "test/f1"), ("D", "test/f1")]
    text = markdown_table(summary, "A")
    blocks = text.split("\n\n**")
    assert len(blocks) == 2 and blocks[1].startswith("test/f1**")
    lines = text.splitlines()
    assert lines[2] == (
        "| strategy | seeds | mean ± std | 95% CI | Δ vs baseline [95% CI] | p (t) "
        "| p (t, Holm) | p (W) |"
    )
    c_row = [cell.strip() for cell in lines[5].strip("|").split("|")]
    assert c_row[0] == "C" and c_row[4:] == ["no pairs", "", "", ""]


def test_a_strategy_without_a_metric_is_a_row_of_na() -> None:
    runs = rows(A=A, B=B)
    runs += [{"strategy": "B", "seed": seed, "test/acc/m0": v} for seed, v in enumerate(A)]
    summary = summarise(runs, ["test/acc", "test/acc/m0"], baseline="A")
    assert ("A", "test/acc/m0") not in {(e["strategy"], e["metric"]) for e in summary}
    text = markdown_table(summary, "A", strategies=["A", "B", "C"])
    acc, m0 = text.split("\n\n**test/acc/m0**")
    assert acc.splitlines()[4].startswith("| A | 3 | 0.9200 ± 0.0200 |")
    assert acc.splitlines()[6] == "| C | 0 | n/a | n/a | n/a |  |  |  |"  # C: no run finished
    lines = m0.splitlines()
    assert lines[4] == "| A | 0 | n/a | n/a | n/a |  |  |  |"  # the baseline lacks it: no pairs
    assert lines[5].startswith("| B | 3 | 0.9200 ± 0.0200 |") and "| no pairs |" in lines[5]
    assert lines[6] == "| C | 0 | n/a | n/a | n/a |  |  |  |" and len(lines) == 7
    # the strategies default to those of the summary; a strategy it has is never dropped
    assert markdown_table(summary, "A").count("\n| ") == 3 + 3  # header, A, B per table
    assert "| B | 3 |" in markdown_table(summary, "A", strategies=["A"])


def test_a_metric_no_strategy_has_is_a_table_of_na() -> None:
    summary = summarise(rows(A=A, B=B), ["test/acc", "test/acc/pix"], baseline="A")
    text = markdown_table(summary, "A", metrics=["test/acc", "test/acc/pix"])
    acc, pix = text.split("\n\n**test/acc/pix**")
    assert acc.count("\n| ") == 3 and pix.startswith(" (mean ± std")
    assert pix.splitlines()[4:] == [
        "| A | 0 | n/a | n/a | n/a |  |  |  |",
        "| B | 0 | n/a | n/a | n/a |  |  |  |",
    ]


def test_plot_leaves_out_what_a_strategy_did_not_measure(tmp_path) -> None:
    from mmlearn.evaluation.report import plot

    runs = rows(A=A, B=B) + [{"strategy": "B", "seed": 0, "test/acc/m0": 0.7}]
    summary = summarise(runs, ["test/acc", "test/acc/m0"], baseline="A")
    path = tmp_path / "p.png"
    assert plot(runs, summary, path, strategies=["A", "B", "C"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot([], [], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_holm_adjusts_by_hand_values_and_keeps_nan() -> None:
    from mmlearn.evaluation.report import holm

    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    got = holm([0.5, math.nan, 0.02])
    assert math.isnan(got[1]) and got[0] == pytest.approx(0.5) and got[2] == pytest.approx(0.04)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_constant_differences_have_no_t_test_p() -> None:
    # every seed 0.002 below the baseline: no spread, so no t-test (its p would be 0)
    summary = summarise(rows(A=[0.9, 0.8, 0.7], B=[0.898, 0.798, 0.698]), ["test/acc"], "A")
    (b,) = [e for e in summary if e["strategy"] == "B"]
    assert math.isnan(b["p_ttest"]) and math.isnan(b["p_holm"])
    assert b["p_wilcoxon"] == pytest.approx(0.25)
    # as the metrics give them: float32 accuracies, equal differences up to the 8th digit
    a32 = [0.9840000152587891, 0.9879999756813049, 0.9819999933242798]
    b32 = [0.9819999933242798, 0.9860000014305115, 0.9800000190734863]
    (b,) = [e for e in summarise(rows(A=a32, B=b32), ["test/acc"], "A") if e["strategy"] == "B"]
    assert math.isnan(b["p_ttest"])
