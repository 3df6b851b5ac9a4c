"""The files of one evaluation (:class:`~mmlearn.evaluation.evaluate.Evaluation`) and its text.

| file | contents |
|---|---|
| ``missing.csv`` | one row per (semantics, subset): the metrics, or a note saying why not |
| ``shapley.csv`` | semantics, metric, modality, Shapley value, v(empty), v(all) |
| ``probes.csv`` | one row per encoder: the probe's and the unimodal head's test accuracy |
| ``evaluation.json`` | all of it, with the semantics' meanings and where the means came from |
| ``summary.md`` | the same as Markdown tables |
| ``reliability.png`` | reliability diagram of the prediction (and of each unimodal expert) |
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmlearn.evaluation.calibration import plot_reliability
from mmlearn.evaluation.evaluate import METRICS, SEMANTICS_TEXT, Evaluation
from mmlearn.evaluation.report import write_csv

FILES = (
    "missing.csv",
    "shapley.csv",
    "probes.csv",
    "evaluation.json",
    "summary.md",
    "reliability.png",
)


def metric_keys(result: Evaluation) -> list[str]:
    """The metrics this task has, in :data:`METRICS` order."""
    return [k for k in METRICS if k in result.prior]


def to_json(result: Evaluation, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything measured, as plain values (what ``evaluation.json`` holds)."""
    used = list(dict.fromkeys(r["semantics"] for r in result.rows))
    return dict(extra or {}) | {
        "strategy": result.strategy,
        **result.options,
        "modalities": result.modalities,
        "n_test": result.n_test,
        "semantics": {s: SEMANTICS_TEXT[s] for s in used},
        "impute_mean_source": result.means_source,
        "full": result.full(),
        "prior": result.prior,
        "experts": result.experts,
        "missing": result.rows,
        "shapley_metric": result.metric,
        "shapley": result.shapley,
        "probes": result.probes,
    }


def write(result: Evaluation, out: Path, extra: Mapping[str, Any] | None = None) -> list[Path]:
    """Write the files of :data:`FILES` into ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    keys = metric_keys(result)
    rows = [
        {"semantics": r["semantics"], "subset": r["subset"], "size": r["size"]}
        | {k: r.get(k, "") for k in keys}
        | {"note": r.get("note", "")}
        for r in result.rows
    ]
    write_csv(out / "missing.csv", rows)
    full = result.full()
    shap = [
        {
            "semantics": s,
            "metric": result.metric,
            "modality": m,
            "shapley": v,
            "v_empty": result.prior[result.metric],
            "v_all": full[result.metric],
        }
        for s, values in result.shapley.items()
        for m, v in values.items()
    ]
    write_csv(out / "shapley.csv", shap or [{"semantics": "", "note": no_shapley(result)}])
    probes = [{k: ("" if v is None else v) for k, v in p.items()} for p in result.probes]
    write_csv(out / "probes.csv", probes or [{"encoder": "", "note": "probes not run"}])
    (out / "evaluation.json").write_text(json.dumps(to_json(result, extra), indent=1) + "\n")
    (out / "summary.md").write_text(markdown(result))
    curves = {"prediction": (result.full_log_probs, result.target)}
    curves |= {f"expert {m}": (lp, result.target) for m, lp in result.expert_log_probs.items()}
    plot_reliability(
        curves, result.multilabel, out / "reliability.png", f"{result.strategy}: reliability"
    )
    return [out / f for f in FILES]


def _f(x: object, digits: int = 4) -> str:
    if x is None or x == "" or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]


def markdown(result: Evaluation) -> str:
    """``summary.md``: the calibration, the missing-modality matrix, Shapley values, probes."""
    keys = metric_keys(result)
    full = result.full()
    lines = [f"# {result.strategy}: evaluation on the test split ({result.n_test} samples)", ""]
    lines += _table(["", *keys], [["prediction", *(full.get(k) for k in keys)]])
    lines += [
        "",
        f"Class prior (the empty set): {result.prior.get('acc', math.nan):.4f} acc, "
        f"{result.prior.get('nll', math.nan):.4f} NLL.",
        "",
    ]
    lines += missing_table(result, "acc")
    if not result.shapley:
        lines += ["", no_shapley(result)]
    if result.shapley:
        lines += ["", f"## Shapley values ({result.metric}; sum = v(all) - v(empty))", ""]
        sems = list(result.shapley)
        body = [[m, *(result.shapley[s][m] for s in sems)] for m in result.modalities]
        lines += _table(["modality", *sems], body)
    if result.probes:
        lines += ["", "## Linear probes of the frozen encoders (test accuracy)", ""]
        body = [[p["encoder"], p["probe_acc"], p["head_acc"]] for p in result.probes]
        lines += _table(["encoder", "probe", "unimodal head"], body)
    lines += ["", "Semantics:"]
    used = dict.fromkeys(r["semantics"] for r in result.rows)
    lines += [f"- `{s}`: {SEMANTICS_TEXT[s]}" for s in used]
    lines.append(f"- `impute_mean` inputs: {result.means_source}")
    return "\n".join(lines) + "\n"


def missing_table(result: Evaluation, metric: str) -> list[str]:
    """The missing-modality matrix as Markdown: one row per subset, one column per semantics."""
    sems = list(dict.fromkeys(r["semantics"] for r in result.rows))
    subsets = list(dict.fromkeys(r["subset"] for r in result.rows))
    cells = {(r["semantics"], r["subset"]): r.get(metric) for r in result.rows}
    lines = [f"## Missing modalities: {metric} with only these modalities present", ""]
    lines += _table(["present", *sems], [[s, *(cells[(m, s)] for m in sems)] for s in subsets])
    notes = {r["semantics"]: r["note"] for r in result.rows if "note" in r}
    lines += [f"\n`{s}`: {n}" for s, n in notes.items()]
    return lines


def no_shapley(result: Evaluation) -> str:
    """Why an evaluation has no Shapley values."""
    n = len(dict.fromkeys(r["subset"] for r in result.rows))
    need = 2 ** len(result.modalities) - 1
    if n < need:
        return (
            f"Shapley values: not computed: they need every subset ({need}); {n} were evaluated "
            "(--subsets)"
        )
    return "Shapley values: not computed: no semantics has every subset available"


def console(result: Evaluation, files: Sequence[Path]) -> str:
    """The lines ``mmlearn evaluate`` prints: the prediction's figures and the files."""
    full = result.full()
    keys = metric_keys(result)
    head = ", ".join(f"{k} {full[k]:.4f}" for k in keys if k in full)
    lines = [f"{result.strategy} on {result.n_test} test samples: {head}"]
    for s, values in result.shapley.items():
        shown = ", ".join(f"{m} {v:+.4f}" for m, v in values.items())
        lines.append(f"Shapley ({result.metric}, {s}): {shown}")
    if not result.shapley:
        lines.append(no_shapley(result))
    if result.probes:
        shown = ", ".join(f"{p['encoder']} {p['probe_acc']:.3f}" for p in result.probes)
        lines.append(f"probe accuracy: {shown}")
    lines.append(f"evaluation written to {files[0].parent}: " + ", ".join(f.name for f in files))
    return "\n".join(lines)
