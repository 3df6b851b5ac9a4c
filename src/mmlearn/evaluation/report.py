"""Statistics and reports of a strategy comparison: intervals over seeds, paired tests, a plot.

Each strategy was run once per seed, and at a given seed every strategy saw the same split and
batch order (``mmlearn compare`` sets both from the seed), so differences are *paired* by seed:
the paired t-test (Student 1908; one-sample t on the per-seed differences, = ``ttest_rel``) vs
the baseline is the primary test, with the Wilcoxon signed-rank test (Wilcoxon 1945) as the
distribution-free check. With few seeds both have little power: read the interval of the mean
difference first, the p-value second. Intervals are two-sided 95% Student-t intervals of the mean.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

Row = dict[str, Any]


def _interval(values: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, sample std, and the 95% t-interval of the mean (NaN bounds with one value)."""
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return mean, 0.0, math.nan, math.nan
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def _paired(diffs: np.ndarray) -> tuple[float, float]:
    """(paired t-test p, Wilcoxon signed-rank p) of ``diffs`` against 0; NaN where undefined.

    Differences that are all equal have no spread: the t statistic is infinite and its p of 0
    would read as certainty from, say, 3 seeds; it is NaN instead (the interval says the rest).
    """
    if len(diffs) < 2 or not np.any(diffs):
        return math.nan, math.nan
    # equal up to float noise: accuracies of float32 metrics differ in the 8th digit
    if np.allclose(diffs, diffs[0], rtol=0.0, atol=1e-6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return math.nan, float(stats.wilcoxon(diffs).pvalue)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant differences: scipy warns, the p is still right
        t_p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
        w_p = float(stats.wilcoxon(diffs).pvalue)
    return t_p, w_p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979; NaN stays NaN, not counted).

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``: the
    family-wise error over the compared strategies stays below the level.
    """
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    m = len(order)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def summarise(rows: Sequence[Row], metrics: Sequence[str], baseline: str) -> list[Row]:
    """One row per (strategy, metric): n, mean, std, 95% CI, and the paired test vs ``baseline``.

    Args:
        rows: one per run, with ``strategy``, ``seed`` and a float per metric key.
        metrics: metric keys to summarise (``test/acc`` ...); runs lacking one are left out of it.
        baseline: the strategy every other is compared with, paired by seed.
    """
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    if baseline not in strategies:
        raise ValueError(f"baseline {baseline!r} is not among the strategies {strategies}")
    out: list[Row] = []
    for metric in metrics:
        by_seed = {
            s: {r["seed"]: float(r[metric]) for r in rows if r["strategy"] == s and metric in r}
            for s in strategies
        }
        for s in strategies:
            values = np.array(list(by_seed[s].values()))
            if values.size == 0:
                continue
            mean, std, lo, hi = _interval(values)
            entry: Row = {"strategy": s, "metric": metric, "n": values.size, "mean": mean}
            entry |= {"std": std, "ci_low": lo, "ci_high": hi}
            seeds = sorted(set(by_seed[s]) & set(by_seed[baseline]))
            diffs = np.array([by_seed[s][k] - by_seed[baseline][k] for k in seeds])
            if s != baseline and diffs.size:
                d_mean, _, d_lo, d_hi = _interval(diffs)
                t_p, w_p = _paired(diffs)
                entry |= {"pairs": diffs.size, "diff": d_mean, "diff_ci_low": d_lo}
                entry |= {"diff_ci_high": d_hi, "p_ttest": t_p, "p_wilcoxon": w_p}
            out.append(entry)
        # the tests of one metric against the baseline are a family: Holm over the strategies
        tested = [e for e in out if e["metric"] == metric and "p_ttest" in e]
        for e, p in zip(tested, holm([e["p_ttest"] for e in tested]), strict=True):
            e["p_holm"] = p
    return out


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(
    summary: Sequence[Row],
    baseline: str,
    strategies: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> str:
    """The comparison as Markdown: one table per metric, strategies as rows.

    Args:
        summary: the entries of :func:`summarise`.
        baseline: the strategy the differences are taken against (named in each table's title).
        strategies: the rows of every table, in order (default: every strategy of ``summary``).
            A strategy without an entry for a metric (it does not log it, or none of its runs
            finished) is a row of ``n/a`` in that metric's table.
        metrics: the tables, in order (default: every metric of ``summary``); a metric no
            strategy has is a table of ``n/a`` rows.
    """
    strategies = list(strategies or dict.fromkeys(e["strategy"] for e in summary))
    blocks = []
    for metric in metrics or dict.fromkeys(e["metric"] for e in summary):
        lines = [
            f"**{metric}** (mean ± std over seeds, 95% CI; paired by seed vs **{baseline}**)",
            "",
            "| strategy | seeds | mean ± std | 95% CI | Δ vs baseline [95% CI] | p (t) "
            "| p (t, Holm) | p (W) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        entries = {e["strategy"]: e for e in summary if e["metric"] == metric}
        for s in [*strategies, *(s for s in entries if s not in strategies)]:
            e = entries.get(s)
            if e is None:
                lines.append(f"| {s} | 0 | n/a | n/a | n/a |  |  |  |")
                continue
            ci = f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]"
            if "diff" in e:
                diff = f"{e['diff']:+.4f} [{_fmt(e['diff_ci_low'])}, {_fmt(e['diff_ci_high'])}]"
                p_t, p_w = _fmt(e["p_ttest"], 3), _fmt(e["p_wilcoxon"], 3)
                p_h = _fmt(e.get("p_holm", math.nan), 3)
            else:
                diff = "(baseline)" if e["strategy"] == baseline else "no pairs"
                p_t = p_h = p_w = ""
            cells = [e["strategy"], str(e["n"]), f"{e['mean']:.4f} ± {e['std']:.4f}", ci, diff]
            lines.append("| " + " | ".join([*cells, p_t, p_h, p_w]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """Rows as CSV; the header is the union of their keys in first-seen order."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


# Drawing only (positions, colours, sizes): the numbers it draws come from `summarise`, which the
# mutation tests cover; a mutant here changes the picture's looks, not a reported figure.
# pragma: no mutate start
def plot(
    rows: Sequence[Row],
    summary: Sequence[Row],
    path: Path,
    strategies: Sequence[str] | None = None,
) -> bool:
    """One panel per metric: each seed as a dot, the mean with its 95% CI as a bar.

    ``strategies`` (default: those of ``summary``) are the x positions of every panel; one with no
    entry for a metric is left out of that panel (marked ``n/a``). Returns ``False`` and writes
    nothing when ``summary`` is empty.
    """
    metrics = list(dict.fromkeys(e["metric"] for e in summary))
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    strategies = list(strategies or dict.fromkeys(e["strategy"] for e in summary))
    strategies += [s for s in dict.fromkeys(e["strategy"] for e in summary) if s not in strategies]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(1.2 + 1.1 * len(strategies) * len(metrics), 3.6), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        entries = {e["strategy"]: e for e in summary if e["metric"] == metric}
        for i, s in enumerate(strategies):
            e = entries.get(s)
            if e is None:  # not measured for this strategy: nothing to draw
                ax.text(i, 0.02, "n/a", transform=ax.get_xaxis_transform(), ha="center")
                continue
            seeds = [float(r[metric]) for r in rows if r["strategy"] == s and metric in r]
            ax.scatter(
                np.full(len(seeds), i) + np.linspace(-0.12, 0.12, len(seeds)),
                seeds,
                s=14,
                color="0.55",
                zorder=2,
            )
            err = (
                None
                if math.isnan(e["ci_low"])
                else [[e["mean"] - e["ci_low"]], [e["ci_high"] - e["mean"]]]
            )
            ax.errorbar([i], [e["mean"]], yerr=err, fmt="o", color="C0", capsize=4, zorder=3)
        ax.set_xticks(range(len(strategies)), strategies, rotation=30, ha="right")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mean and 95% CI over seeds (dots: single seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# pragma: no mutate end
