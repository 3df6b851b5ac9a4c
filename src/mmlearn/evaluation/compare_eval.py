"""``mmlearn compare --evaluate``: the evaluation of every run, summarised across strategies.

Each run's best checkpoint is evaluated (:func:`~mmlearn.evaluation.evaluate.evaluate`, files in
``RUN/evaluate/<checkpoint>/``); this module reads those ``evaluation.json`` files back and
writes, into the compare's ``--out``:

- ``evaluation_summary.csv``: per (strategy, measure) n, mean, std, 95% CI, and the paired
  difference to the baseline with its t and Wilcoxon p and the Holm-corrected p;
- ``evaluation.md``: calibration, missing-modality, Shapley and probe tables, the probe gap,
  the dependency report;
- ``probe_gap.csv``: per (strategy, modality) the paired difference between the probe of the
  strategy's encoder and the probe of the encoder trained alone (:func:`probe_gap`);
- ``missing_heatmap.png``: strategies x subsets of present modalities, mean accuracy, a panel
  per semantics;
- ``risk.png``: test risk (1 - accuracy) against the number of modalities present, and against
  the training-set size when the compare ran ``--train_fractions``.

The dependency report (docs/methods.md section 8, I2M2's argument) reads the runs of
``InterOnly``, ``IntraOnly`` (``mode: independent``) and ``I2M2`` as information gains over the
class prior, in nats.

The probe gap (modality imbalance, Peng et al., OGM-GE, CVPR 2022) reads every strategy's frozen
encoder of a modality against the same modality's encoder of the ``IntraOnly`` run with
``mode: independent``, whose experts are each trained on their own loss: "trained alone".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmlearn.evaluation.protocol import settings
from mmlearn.evaluation.report import Row, summarise, write_csv

#: the measures of every run's evaluation that are summarised, as key prefixes
CALIBRATION = ("acc", "nll", "ece", "brier", "auroc", "auprc")
#: the files ``--evaluate`` adds to a compare's ``--out`` (refused there without --overwrite)
EVAL_REPORTS = (
    "evaluation_summary.csv",
    "evaluation.md",
    "probe_gap.csv",
    "missing_heatmap.png",
    "risk.png",
)
#: fewest pairs for which the two-sided exact Wilcoxon signed-rank test can reach p < 0.05
WILCOXON_MIN_PAIRS = 6


def flatten(saved: Mapping[str, Any]) -> dict[str, float]:
    """One run's ``evaluation.json`` as ``{measure: value}``.

    Keys: ``full/{metric}`` (the prediction with every modality), ``prior/nll``,
    ``missing/{semantics}/{subset}`` (accuracy), ``shapley/{semantics}/{modality}`` (of the
    evaluation's Shapley metric), ``probe/{encoder}``, ``expert_nll/{modality}``.
    """
    out: dict[str, float] = {}
    for k, v in saved["full"].items():
        if k in CALIBRATION:
            out[f"full/{k}"] = float(v)
    out["prior/nll"] = float(saved["prior"]["nll"])
    for r in saved["missing"]:
        if "acc" in r:
            out[f"missing/{r['semantics']}/{r['subset']}"] = float(r["acc"])
    for s, values in saved.get("shapley", {}).items():
        for m, v in values.items():
            out[f"shapley/{s}/{m}"] = float(v)
    for p in saved.get("probes", []):
        out[f"probe/{p['encoder']}"] = float(p["probe_acc"])
    for m, e in saved.get("experts", {}).items():
        out[f"expert_nll/{m}"] = float(e["nll"])
    return out


def summarise_evaluation(rows: Sequence[Row], baseline: str) -> list[Row]:
    """:func:`~mmlearn.evaluation.report.summarise` over every flattened measure.

    Args:
        rows: one per run: ``strategy``, ``seed`` and the :func:`flatten` keys.
        baseline: the strategy every other is paired with by seed.

    Returns:
        entries as ``summarise`` gives them with ``p_holm``: the paired t-test's p adjusted
        over the strategies compared with the baseline on that measure.
    """
    measures = list(dict.fromkeys(k for r in rows for k in r if "/" in k))
    return summarise(rows, measures, baseline)


def _f(x: object, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _cell(e: Row | None, paired: bool = False) -> str:
    if e is None:
        return "n/a"
    ci = "" if math.isnan(e["ci_low"]) else f" [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
    text = f"{e['mean']:.4f}{ci}"
    if paired and "diff" in e:
        text += f"; Δ {e['diff']:+.4f}, p_Holm {_f(e.get('p_holm'), 3)}"
    return text


def _table(
    summary: Sequence[Row], strategies: Sequence[str], measures: Sequence[str], paired: bool
) -> list[str]:
    by = {(e["strategy"], e["metric"]): e for e in summary}
    header = ["strategy", *(m.split("/", 1)[1] for m in measures)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in strategies:
        cells = [_cell(by.get((s, m)), paired) for m in measures]
        lines.append("| " + " | ".join([s, *cells]) + " |")
    return lines


def seeds_note(rows: Sequence[Row], strategies: Sequence[str], baseline: str) -> str | None:
    """A sentence when too few seeds are paired for a test to reach p < 0.05, else ``None``."""
    seeds = {s: {r["seed"] for r in rows if r["strategy"] == s} for s in strategies}
    pairs = [len(seeds[s] & seeds[baseline]) for s in strategies if s != baseline]
    if not pairs or min(pairs) >= WILCOXON_MIN_PAIRS:
        return None
    n = min(pairs)
    return (
        f"too few seeds: with {n} paired seed{'s' if n != 1 else ''} the Wilcoxon test cannot "
        f"reach p < 0.05 (it needs {WILCOXON_MIN_PAIRS}), and a t-test on {n} differences says "
        "little; read the 95% intervals, not the p-values"
    )


def markdown(
    rows: Sequence[Row],
    summary: Sequence[Row],
    strategies: Sequence[str],
    baseline: str,
    dependency: str | None,
    compact: bool = False,
    gap: str | None = None,
) -> str:
    """``evaluation.md``: calibration, missing modalities, Shapley values, probes, probe gap
    (``gap``, the Markdown of :func:`gap_markdown`), dependency.

    ``compact`` (what the terminal shows): beyond 7 subsets, only each modality alone and all.
    """
    measures = list(dict.fromkeys(e["metric"] for e in summary))
    lines = [f"# Evaluation over seeds (mean [95% CI]; paired by seed vs **{baseline}**)", ""]
    note = seeds_note(rows, strategies, baseline)
    if note:
        lines += [f"Note: {note}.", ""]
    groups = [
        ("Calibration of the prediction (all modalities)", "full/", True),
        ("Missing modalities: accuracy with only these present", "missing/", False),
        ("Shapley values of the modalities", "shapley/", False),
        ("Linear probes of the frozen encoders (test accuracy)", "probe/", False),
    ]
    for title, prefix, paired in groups:
        chosen = [m for m in measures if m.startswith(prefix)]
        if not chosen:
            continue
        lines += [f"## {title}", ""]
        if prefix == "missing/":
            for sem in dict.fromkeys(m.split("/")[1] for m in chosen):
                mine = [m for m in chosen if m.split("/")[1] == sem]
                if compact and len(mine) > 7:
                    size = max(m.count("+") for m in mine)
                    mine = [m for m in mine if m.count("+") in (0, size)]
                    sem += " (each alone, and all; every subset: evaluation.md, the heatmap)"
                lines += [f"`{sem}`:", "", *_transposed(summary, strategies, mine), ""]
            continue
        if prefix == "shapley/":  # one table per semantics: strategies x modalities
            for sem in dict.fromkeys(m.split("/")[1] for m in chosen):
                mine = [m for m in chosen if m.split("/")[1] == sem]
                short = [f"{sem}/{m.rsplit('/', 1)[1]}" for m in mine]
                table = _table(summary, strategies, mine, paired)
                table[0] = "| strategy | " + " | ".join(x.split("/")[1] for x in short) + " |"
                lines += [f"`{sem}`:", "", *table, ""]
            continue
        lines += [*_table(summary, strategies, chosen, paired), ""]
    if gap:
        lines += ["## Probe gap: each encoder against the encoder trained alone", "", gap, ""]
    if dependency:
        lines += ["## Where the label lives", "", dependency, ""]
    return "\n".join(lines)


def _transposed(
    summary: Sequence[Row], strategies: Sequence[str], measures: Sequence[str]
) -> list[str]:
    """Subsets as rows, strategies as columns (63 subsets do not fit across a page)."""
    by = {(e["strategy"], e["metric"]): e for e in summary}
    lines = ["| present | " + " | ".join(strategies) + " |", "|" + "---|" * (len(strategies) + 1)]
    for m in measures:
        cells = [_f(by[(s, m)]["mean"]) if (s, m) in by else "n/a" for s in strategies]
        lines.append(f"| {m.rsplit('/', 1)[1]} | " + " | ".join(cells) + " |")
    return lines


# ---- the probe gap ----------------------------------------------------------------------------
def modality_of(encoder: str) -> str:
    """The modality of an encoder name: its last dot-separated part (``joint.fou`` -> ``fou``)."""
    return encoder.rsplit(".", 1)[-1]


def gap_encoder(encoders: Sequence[str], modality: str) -> str | None:
    """The encoder of ``modality`` the probe gap reads among a run's ``encoders``.

    The first one whose name ends in ``.<modality>``; where there are several (I2M2 has
    ``joint.<m>`` and ``experts.<m>``), the joint model's (``joint.<m>``). ``None``: none.
    """
    mine = [e for e in encoders if modality_of(e) == modality]
    joint = [e for e in mine if e.split(".", 1)[0] == "joint"]
    chosen = joint or mine
    return chosen[0] if chosen else None


def alone_reference(runs: Sequence[Mapping[str, Any]], strategies: Sequence[str]) -> str | None:
    """The label of the first strategy (in ``strategies`` order) run as ``IntraOnly`` with
    ``mode: independent``: each modality's expert trained on its own loss. ``None``: none."""
    kinds = {r["strategy"]: (r["saved"].get("strategy"), r["saved"].get("mode")) for r in runs}
    order = [*strategies, *(s for s in kinds if s not in strategies)]
    return next((s for s in order if kinds.get(s) == ("IntraOnly", "independent")), None)


def read_gap(strategy: str, modality: str, encoder: str, entry: Row) -> str:
    """One sentence on a probe-gap row: below, above, no measurable gap, or too few seeds.

    ``entry`` holds ``pairs``, ``diff``, ``diff_ci_low``, ``diff_ci_high`` (the strategy's
    probe minus the encoder trained alone, accuracy in [0, 1]; the sentence says points, x100).
    """
    who = f"{strategy}'s encoder of modality {modality} ({encoder})"
    pairs = int(entry.get("pairs", 0))
    if pairs == 0:
        return (
            f"{who}: no seed paired with an encoder of {modality} trained alone, no gap measured."
        )
    pts, lo, hi = (100 * float(entry[k]) for k in ("diff", "diff_ci_low", "diff_ci_high"))
    if math.isnan(lo):
        return (
            f"{who}: {pts:+.1f} points against the encoder trained alone, from 1 seed: no interval."
        )
    ci = f"difference {pts:+.1f}, 95% CI [{lo:+.1f}, {hi:+.1f}] points over {pairs} seeds"
    if hi < 0:
        return (
            f"{strategy} leaves modality {modality}'s encoder ({encoder}) {-pts:.1f} points "
            f"below the encoder trained alone ({ci})."
        )
    if lo > 0:
        return f"{who} probes {pts:.1f} points above the encoder trained alone ({ci})."
    return f"{who}: no measurable gap to the encoder trained alone ({ci})."


#: the statistics of a probe-gap row
GAP_STATS = ("diff", "diff_ci_low", "diff_ci_high", "p_ttest", "p_wilcoxon", "p_holm")


def probe_gap(
    runs: Sequence[Mapping[str, Any]], strategies: Sequence[str]
) -> tuple[str | None, list[Row]]:
    """The probe of every strategy's encoder of each modality against the encoder trained alone.

    The reference is :func:`alone_reference`; its encoder of modality m is ``experts.<m>``. A
    strategy trained on other data than the reference (the runs' ``data`` setting, from their
    configs) gets a row saying so and no statistics. For
    every other strategy and modality (encoder by :func:`gap_encoder`), the difference of the
    probes' test accuracies (strategy minus reference) is paired by seed and summarised by
    :func:`~mmlearn.evaluation.report.summarise`: mean, 95% t interval, paired t, Wilcoxon and
    Holm p (over the strategies, per modality).

    Args:
        runs: one per run: ``strategy``, ``seed``, ``saved`` (its ``evaluation.json``).
        strategies: the compared labels, in order.

    Returns:
        (the reference's label or ``None``, one row per (strategy, modality): ``strategy``,
        ``modality``, ``encoder``, ``reference``, ``reference_encoder``, ``n``, ``probe`` (its
        mean), ``reference_probe`` (the reference's mean over the paired seeds), ``pairs``,
        ``diff``, ``diff_ci_low``, ``diff_ci_high``, ``p_ttest``, ``p_wilcoxon``, ``p_holm``,
        ``reading``); no rows without a reference or without probes.
    """
    ref = alone_reference(runs, strategies)
    if ref is None:
        return None, []
    values: list[Row] = []
    used: dict[tuple[str, str], str] = {}
    for run in runs:
        acc = {p["encoder"]: float(p["probe_acc"]) for p in run["saved"].get("probes", [])}
        value: Row = {"strategy": run["strategy"], "seed": run["seed"]}
        for m in dict.fromkeys(modality_of(e) for e in acc):
            encoder = gap_encoder(list(acc), m)
            if encoder is not None:
                value[f"probe/{m}"] = acc[encoder]
                used.setdefault((run["strategy"], m), encoder)
        values.append(value)
    modalities = list(dict.fromkeys(k.split("/", 1)[1] for r in values for k in r if "/" in k))
    if not modalities or not any(r["strategy"] == ref for r in values):
        return ref, []
    summary = summarise(values, [f"probe/{m}" for m in modalities], ref)
    by = {(e["strategy"], e["metric"].split("/", 1)[1]): e for e in summary}
    order = list(dict.fromkeys([*strategies, *(r["strategy"] for r in values)]))
    data = {s: {str(r["data"]) for r in runs if r["strategy"] == s and "data" in r} for s in order}
    out: list[Row] = []
    for s in order:
        for m in modalities:
            e = by.get((s, m))
            if s == ref or e is None:
                continue
            row: Row = {"strategy": s, "modality": m, "encoder": used[(s, m)], "reference": ref}
            row |= {"reference_encoder": used.get((ref, m), ""), "n": e["n"], "probe": e["mean"]}
            if data[s] and data[ref] and data[s] != data[ref]:
                # an encoder trained alone on other data is no reference for this one
                row |= {"reference_probe": math.nan, "pairs": 0}
                row |= {k: math.nan for k in GAP_STATS}
                row["reading"] = (
                    f"{s}'s encoder of modality {m}: not compared: the reference {ref} was "
                    f"trained on other data ({', '.join(sorted(data[ref]))}, not "
                    f"{', '.join(sorted(data[s]))})."
                )
                out.append(row)
                continue
            mine = {r["seed"] for r in values if r["strategy"] == s and f"probe/{m}" in r}
            theirs = {
                r["seed"]: r[f"probe/{m}"]
                for r in values
                if r["strategy"] == ref and f"probe/{m}" in r
            }
            paired = [theirs[k] for k in sorted(mine & set(theirs))]
            row |= {"reference_probe": float(np.mean(paired)) if paired else math.nan}
            row["pairs"] = e.get("pairs", 0)
            for k in GAP_STATS:
                row[k] = e.get(k, math.nan)
            row["reading"] = read_gap(s, m, used[(s, m)], row)
            out.append(row)
    return ref, out


def gap_markdown(ref: str | None, rows: Sequence[Row], strategies: Sequence[str]) -> str:
    """The probe-gap section of ``evaluation.md``: a table and one sentence per row, or why
    there is none (no ``IntraOnly`` with ``mode: independent``, no probes)."""
    if ref is None:
        return (
            "Not computed: this comparison has no IntraOnly run with `mode: independent` (each "
            "modality's expert trained on its own loss), the reference encoder *trained alone*. "
            "Add one on the same data to the compare (e.g. `experiments/imbalance/alone.yaml` "
            "for the imbalance configs, `experiments/mfeat/intra_only.yaml` for mfeat's; "
            "IntraOnly `mode: joint` trains its experts together and is no reference)."
        )
    if not rows:
        others = [s for s in strategies if s != ref]
        why = "no other strategy to compare" if not others else "no run has probes"
        return f"Reference **{ref}** (IntraOnly, mode: independent); nothing to report: {why}."
    lines = [
        f"Reference: **{ref}** (IntraOnly, `mode: independent`: each modality's expert "
        "trained on its own loss, the encoder *trained alone*). Δ = the probe's test accuracy "
        "of the strategy's encoder minus that of the reference's encoder of the same modality, "
        "paired by seed: mean [95% t CI]; below 0, joint training left the encoder knowing less "
        "of its modality than training it alone (modality imbalance).",
        "",
        f"| strategy | modality | encoder | probe | {ref} | Δ [95% CI] | seeds | p_Holm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = f"{r['diff']:+.4f} [{_f(r['diff_ci_low'])}, {_f(r['diff_ci_high'])}]"
        diff = diff if r["pairs"] else "n/a"
        cells = [r["strategy"], r["modality"], f"`{r['encoder']}`", _f(r["probe"])]
        cells += [_f(r["reference_probe"]), diff, str(r["pairs"]), _f(r["p_holm"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {r['reading']}" for r in rows)]
    return "\n".join(lines)


# ---- the dependency report --------------------------------------------------------------------
def dependency_report(runs: Sequence[Mapping[str, Any]]) -> str | None:
    """Information gains over the class prior from InterOnly, IntraOnly and I2M2 runs.

    Args:
        runs: one per run: ``seed``, ``saved`` (its ``evaluation.json``, with ``strategy`` and
            ``mode``).

    Returns:
        A Markdown table of gains in nats (mean [95% CI] over seeds) and one sentence, or
        ``None`` without an InterOnly and an IntraOnly run.
    """
    gains: dict[str, dict[int, float]] = {}
    for run in runs:
        saved, seed = run["saved"], run["seed"]
        prior = float(saved["prior"]["nll"])
        full = prior - float(saved["full"]["nll"])
        kind = saved["strategy"]
        if kind == "InterOnly":
            gains.setdefault("joint (InterOnly)", {})[seed] = full
        elif kind == "I2M2":
            gains.setdefault("I2M2", {})[seed] = full
        elif kind == "IntraOnly":
            gains.setdefault("product of unimodal (IntraOnly)", {})[seed] = full
            if saved.get("mode") == "independent":
                for m, e in saved.get("experts", {}).items():
                    gains.setdefault(f"unimodal {m}", {})[seed] = prior - float(e["nll"])
    joint, product = gains.get("joint (InterOnly)"), gains.get("product of unimodal (IntraOnly)")
    if not joint or not product:
        return None
    lines = ["| model | gain over the prior, nats | seeds |", "|---|---|---|"]
    for name, by_seed in gains.items():
        v = np.array(list(by_seed.values()))
        lines.append(f"| {name} | {_mean_ci(v)} | {len(v)} |")
    unimodal = [float(np.mean(list(v.values()))) for k, v in gains.items() if k.startswith("uni")]
    sentence = read_dependency(
        float(np.mean(list(joint.values()))),
        float(np.mean(list(product.values()))),
        max(unimodal) if unimodal else None,
    )
    if not unimodal:
        sentence += (
            " This comparison's IntraOnly runs are mode: joint, so there are no unimodal rows"
            " (jointly trained experts are not unimodal models); the product row is their"
            " jointly trained product. Run IntraOnly with mode: independent for them."
        )
    return "\n".join(lines) + "\n\n" + sentence


def _mean_ci(v: np.ndarray) -> str:
    from scipy import stats

    mean = float(v.mean())
    if len(v) < 2:
        return f"{mean:.4f}"
    half = float(stats.t.ppf(0.975, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]"


#: the product of the unimodal models within this share of the joint model's gain: intra
INTRA_SHARE = 0.9
#: below this share (and no single modality above it either): inter
INTER_SHARE = 0.5


def read_dependency(joint: float, product: float, best_unimodal: float | None) -> str:
    """One plain sentence from the gains (nats) of the joint model and the unimodal product.

    The product of the unimodal models captures what single modalities say; the joint model
    also what they say only together. With ``product >= 0.9 joint`` the label lives mostly in
    single modalities; with ``product < 0.5 joint`` (and no single modality reaching half the
    joint gain) mostly in their interactions; in between, in both, the case I2M2 is meant for.
    """
    if joint <= 0 and product <= 0:
        return "Neither the joint model nor the product of unimodal models beats the class prior."
    share = product / joint if joint > 0 else math.inf
    head = f"The unimodal product reaches {share:.0%} of the joint model's gain"
    if share >= INTRA_SHARE:
        return (
            f"{head}: the label lives mostly in single modalities (intra-modality); modelling "
            "their interactions adds little."
        )
    uni = best_unimodal if best_unimodal is not None else product
    if share < INTER_SHARE and uni < INTER_SHARE * joint:
        return (
            f"{head}: the label lives mostly in the interactions between modalities "
            "(inter-modality); unimodal models miss most of it."
        )
    return (
        f"{head}: the label lives both in single modalities and in their interactions, the "
        "case I2M2 models."
    )


# ---- reading and writing ----------------------------------------------------------------------
def load(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The runs whose ``evaluation`` column names an ``evaluation.json`` that exists."""
    out = []
    for r in rows:
        path = r.get("evaluation")
        if path and Path(str(path)).is_file():
            saved = json.loads(Path(str(path)).read_text())
            found = settings(str(r.get("run_dir", ""))) if r.get("run_dir") else None
            data = {"data": found["data"]} if found else {}
            out.append(
                {"strategy": r["strategy"], "seed": r["seed"], "saved": saved} | _frac(r) | data
            )
    return out


def _frac(r: Row) -> dict[str, float]:
    return {"train_fraction": float(r.get("train_fraction", 1.0) or 1.0)}


def report(
    out: Path, rows: Sequence[Row], strategies: Sequence[str], baseline: str
) -> tuple[str, list[Path]]:
    """Write the files of :data:`EVAL_REPORTS` for the evaluated ``rows``.

    Returns:
        (the Markdown the terminal shows, the files written).
    """
    runs = load(rows)
    if not runs:
        return "no run has an evaluation", []
    full_size = max(r["train_fraction"] for r in runs)
    main = [r for r in runs if r["train_fraction"] == full_size]
    flat = [{"strategy": r["strategy"], "seed": r["seed"]} | flatten(r["saved"]) for r in main]
    names = [s for s in strategies if any(r["strategy"] == s for r in flat)]
    base = baseline if baseline in names else names[0]
    summary = summarise_evaluation(flat, base)
    write_csv(out / "evaluation_summary.csv", summary)
    dependency = dependency_report(main)
    ref, gaps = probe_gap(main, names)
    gap = gap_markdown(ref, gaps, names)
    text = markdown(flat, summary, names, base, dependency, gap=gap)
    (out / "evaluation.md").write_text(text + "\n")
    shown = markdown(flat, summary, names, base, dependency, compact=True, gap=gap)
    from mmlearn.evaluation.eval_plots import heatmap, risk_curves

    files = [out / "evaluation_summary.csv", out / "evaluation.md"]
    if gaps:
        write_csv(out / "probe_gap.csv", gaps)
        files.append(out / "probe_gap.csv")
    if heatmap(summary, names, out / "missing_heatmap.png"):
        files.append(out / "missing_heatmap.png")
    if risk_curves(runs, names, out / "risk.png"):
        files.append(out / "risk.png")
    return shown, files
