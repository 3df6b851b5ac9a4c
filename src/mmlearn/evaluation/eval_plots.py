"""The pictures of ``mmlearn compare --evaluate``: the missing-modality heatmap, the risk curves.

The numbers come from :mod:`mmlearn.evaluation.compare_eval` (tested there); these functions
only draw them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmlearn.evaluation.report import Row

#: the semantics the risk curves use: one meaning of "missing" for every strategy
RISK_SEMANTICS = "impute_mean"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    return plt


# pragma: no mutate start
def heatmap(summary: Sequence[Row], strategies: Sequence[str], path: Path) -> bool:
    """Strategies x subsets, mean accuracy over seeds, one panel per semantics."""
    cells = {
        (e["strategy"], e["metric"]): e["mean"]
        for e in summary
        if str(e["metric"]).startswith("missing/")
    }
    if not cells:
        return False
    sems = list(dict.fromkeys(k.split("/")[1] for _, k in cells))
    seen = list(dict.fromkeys(k.split("/", 2)[2] for _, k in cells))
    subsets = sorted(seen, key=lambda s: (s.count("+"), seen.index(s)))
    plt = _pyplot()
    width = min(4 + 0.32 * len(subsets), 30)
    fig, axes = plt.subplots(
        len(sems),
        1,
        figsize=(width, 1.2 + (0.45 * len(strategies) + 0.8) * len(sems)),
        squeeze=False,
    )
    for ax, sem in zip(axes[:, 0], sems, strict=True):
        grid = np.full((len(strategies), len(subsets)), np.nan)
        for i, s in enumerate(strategies):
            for j, sub in enumerate(subsets):
                grid[i, j] = cells.get((s, f"missing/{sem}/{sub}"), np.nan)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        for row in np.flatnonzero(np.isnan(grid).all(1)):  # a semantics the strategy cannot do
            ax.text(
                (len(subsets) - 1) / 2,
                int(row),
                "not available",
                ha="center",
                va="center",
                fontsize=7,
            )
        ax.set_yticks(range(len(strategies)), strategies, fontsize=8)
        ax.set_xticks(range(len(subsets)), subsets, rotation=90, fontsize=6)
        ax.set_title(f"accuracy with only these modalities present ({sem})", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def risk_curves(runs: Sequence[Mapping[str, Any]], strategies: Sequence[str], path: Path) -> bool:
    """Test risk (1 - accuracy) against the number of modalities present and the training size.

    Huang et al., "What Makes Multi-modal Learning Better than Single (Provably)", NeurIPS 2021:
    with enough data more modalities do not increase the risk; with little data they can. Left:
    the mean over the subsets of each size (``impute_mean``), at the largest training fraction.
    Right (when runs at several ``train_fraction`` exist): the full prediction's risk per
    strategy, and the best unimodal expert's (of an IntraOnly run).
    """
    by_size: dict[str, dict[int, list[float]]] = {}
    top = max(float(r["train_fraction"]) for r in runs)
    for r in runs:
        if float(r["train_fraction"]) != top:
            continue
        for row in r["saved"]["missing"]:
            if row["semantics"] == RISK_SEMANTICS and "acc" in row:
                by_size.setdefault(r["strategy"], {}).setdefault(row["size"], [])
                by_size[r["strategy"]][row["size"]].append(1 - float(row["acc"]))
    fractions = sorted({float(r["train_fraction"]) for r in runs})
    if not by_size:
        return False
    plt = _pyplot()
    panels = 2 if len(fractions) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    ax = axes[0, 0]
    for s in strategies:
        if s in by_size:
            sizes = sorted(by_size[s])
            ax.plot(sizes, [np.mean(by_size[s][k]) for k in sizes], "o-", label=s)
    ax.set_xticks(sorted({k for v in by_size.values() for k in v}))  # counts: whole numbers
    ax.set_xlabel("modalities present (mean over subsets of that size)")
    ax.set_ylabel("test risk (1 - accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if panels == 2:
        ax = axes[0, 1]
        curves: dict[str, dict[float, list[float]]] = {}
        for r in runs:
            f = float(r["train_fraction"])
            curves.setdefault(r["strategy"], {}).setdefault(f, []).append(
                1 - float(r["saved"]["full"]["acc"])
            )
            if r["saved"]["strategy"] == "IntraOnly" and r["saved"].get("experts"):
                best = max(float(e["acc"]) for e in r["saved"]["experts"].values())
                curves.setdefault("best unimodal", {}).setdefault(f, []).append(1 - best)
        for name, points in curves.items():
            xs = sorted(points)
            ax.plot(xs, [np.mean(points[x]) for x in xs], "o-", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("training fraction")
        ax.set_ylabel("test risk (1 - accuracy), all modalities")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# pragma: no mutate end
