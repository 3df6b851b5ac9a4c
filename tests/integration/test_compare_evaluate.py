"""``mmlearn compare --evaluate``: every run evaluated, the evaluations summarised over seeds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from mmlearn.cli import main
from mmlearn.evaluation.compare_eval import (
    dependency_report,
    flatten,
    gap_markdown,
    probe_gap,
    read_dependency,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [
    str(REPO / f"experiments/synthetic/{s}.yaml") for s in ("inter_only", "intra_only", "i2m2")
]


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmp")
    configs = [str(out / Path(c).name) for c in CONFIGS]
    for src, dst in zip(CONFIGS, configs, strict=True):  # IntraOnly as unimodal models
        text = Path(src).read_text().replace("../../", f"{REPO}/")
        Path(dst).write_text(text.replace("mode: joint", "mode: independent"))
    args = ["compare", *configs, "--seeds", "0", "1", "--out", str(out), "--evaluate"]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as done:
        mp.setenv("PL_GLOBAL_SEED", "0")  # undone on exit: the runs' seeds do not leak
        mp.delenv("PL_GLOBAL_SEED")
        main([*args, "--set", "trainer.max_epochs=1", "--set", "data.init_args.n_train=400"])
    assert done.value.code == 0
    return out


def test_every_run_is_evaluated_and_the_summary_pairs_them(compared: Path) -> None:
    results = read(compared / "results.csv")
    assert len(results) == 6
    saved = {}
    for r in results:
        path = Path(r["evaluation"])
        assert path.is_file() and path.parent.parent.name == "evaluate"
        saved[(r["strategy"], r["seed"])] = json.loads(path.read_text())
    # the prediction's accuracy is the run's test/acc (the same best checkpoint, same split)
    for r in results:
        full = saved[(r["strategy"], r["seed"])]["full"]["acc"]
        assert full == pytest.approx(float(r["test/acc"]), abs=1e-6)
    summary = read(compared / "evaluation_summary.csv")
    entry = {(e["strategy"], e["metric"]): e for e in summary}
    key = "missing/impute_mean/m0"
    values = [saved[("i2m2", s)]["missing"][0]["acc"] for s in ("0", "1")]
    assert saved[("i2m2", "0")]["missing"][0]["subset"] == "m0"
    assert float(entry[("i2m2", key)]["mean"]) == pytest.approx(sum(values) / 2)
    diffs = [
        saved[("i2m2", s)]["full"]["ece"] - saved[("inter_only", s)]["full"]["ece"]
        for s in ("0", "1")
    ]
    assert float(entry[("i2m2", "full/ece")]["diff"]) == pytest.approx(sum(diffs) / 2)
    assert ("inter_only", "missing/drop/m0") not in entry  # InterOnly cannot drop
    text = (compared / "evaluation.md").read_text()
    assert "too few seeds" in text and "Where the label lives" in text
    assert "unimodal m0" in text  # IntraOnly was trained as independent unimodal models
    for png in ("missing_heatmap.png", "risk.png", "comparison.png"):
        assert (compared / png).read_bytes()[:4] == b"\x89PNG"
    assert "too few seeds" in (compared / "summary.md").read_text()


def test_the_probe_gap_pairs_each_encoder_with_the_encoder_trained_alone(compared: Path) -> None:
    from scipy import stats

    results = read(compared / "results.csv")
    probes = {
        (r["strategy"], r["seed"]): {
            p["encoder"]: p["probe_acc"]
            for p in json.loads(Path(r["evaluation"]).read_text())["probes"]
        }
        for r in results
    }
    assert set(probes[("i2m2", "0")]) == {"joint.m0", "joint.m1", "experts.m0", "experts.m1"}
    gaps = {(g["strategy"], g["modality"]): g for g in read(compared / "probe_gap.csv")}
    # intra_only (mode: independent) is the reference: no row of its own
    assert set(gaps) == {(s, m) for s in ("inter_only", "i2m2") for m in ("m0", "m1")}
    text = (compared / "evaluation.md").read_text()
    assert "## Probe gap" in text and "Reference: **intra_only**" in text
    for (strategy, m), g in gaps.items():
        assert g["encoder"] == f"joint.{m}"  # I2M2: the joint model's encoder, not its expert
        assert g["reference"] == "intra_only" and g["reference_encoder"] == f"experts.{m}"
        diffs = [
            probes[(strategy, s)][f"joint.{m}"] - probes[("intra_only", s)][f"experts.{m}"]
            for s in ("0", "1")
        ]
        mean = sum(diffs) / 2
        half = stats.t.ppf(0.975, 1) * abs(diffs[0] - diffs[1]) / 2  # std of 2 / sqrt(2)
        assert g["pairs"] == "2"
        assert float(g["diff"]) == pytest.approx(mean, abs=1e-9)
        assert float(g["diff_ci_low"]) == pytest.approx(mean - half, abs=1e-9)
        assert float(g["diff_ci_high"]) == pytest.approx(mean + half, abs=1e-9)
        ref = [probes[("intra_only", s)][f"experts.{m}"] for s in ("0", "1")]
        assert float(g["reference_probe"]) == pytest.approx(sum(ref) / 2, abs=1e-9)
        assert g["reading"] in text
        assert f"{strategy}" in g["reading"] and f"({g['encoder']})" in g["reading"]


def test_collect_reads_the_runs_evaluations_back(compared: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["compare", "--collect", str(compared), "--out", str(tmp_path), "--evaluate"])
    assert done.value.code == 0
    a = {(e["strategy"], e["metric"]): e["mean"] for e in read(compared / "evaluation_summary.csv")}
    b = {(e["strategy"], e["metric"]): e["mean"] for e in read(tmp_path / "evaluation_summary.csv")}
    assert a == b


def test_an_earlier_evaluation_report_is_refused_without_overwrite(
    compared: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["compare", "--collect", str(compared), "--out", str(compared)])
    assert done.value.code == 2
    assert "evaluation_summary.csv" in capsys.readouterr().err


# ---- the dependency report from hand-made evaluations -------------------------------------------
def saved(strategy: str, nll: float, prior: float = 1.0, **kw: object) -> dict[str, object]:
    return {"strategy": strategy, "full": {"nll": nll}, "prior": {"nll": prior}} | kw


def test_the_dependency_report_reads_gains_over_the_prior() -> None:
    experts = {"a": {"nll": 0.7}, "b": {"nll": 0.9}}
    runs = [{"seed": s, "saved": saved("InterOnly", 0.2 + 0.01 * s)} for s in range(3)] + [
        {"seed": s, "saved": saved("IntraOnly", 0.3, mode="independent", experts=experts)}
        for s in range(3)
    ]
    text = dependency_report(runs)
    assert text is not None
    # joint gain 1 - 0.21 (mean), product gain 0.7, unimodal a 0.3, b 0.1
    assert "| joint (InterOnly) | 0.7900 [" in text
    assert "| product of unimodal (IntraOnly) | 0.7000 |" in text or "0.7000 [0.7000" in text
    assert "| unimodal a | 0.3000" in text and "| unimodal b | 0.1000" in text
    assert "89%" in text and "both" in text
    assert dependency_report([r for r in runs if r["saved"]["strategy"] == "InterOnly"]) is None


@pytest.mark.parametrize(
    "joint, product, uni, word",
    [
        (1.0, 0.95, 0.5, "single modalities"),
        (1.0, 1.2, 0.5, "single modalities"),
        (1.0, 0.1, 0.05, "interactions"),
        (1.0, 0.3, 0.6, "both"),  # a strong single modality: not purely inter
        (1.0, 0.7, 0.4, "both"),
        (-0.1, -0.2, None, "Neither"),
    ],
)
def test_read_dependency_thresholds(joint: float, product: float, uni, word: str) -> None:
    assert word in read_dependency(joint, product, uni)


def test_flatten_names_every_measure() -> None:
    flat = flatten(
        {
            "full": {"acc": 0.9, "nll": 0.3, "size": 2, "subset": "a+b"},
            "prior": {"nll": 1.1},
            "missing": [
                {"semantics": "drop", "subset": "a", "acc": 0.6},
                {"note": "x", "semantics": "drop", "subset": "b"},
            ],
            "shapley": {"drop": {"a": 0.1}},
            "probes": [{"encoder": "joint.a", "probe_acc": 0.8}],
            "experts": {"a": {"nll": 0.5}},
        }
    )
    assert flat == {
        "full/acc": 0.9,
        "full/nll": 0.3,
        "prior/nll": 1.1,
        "missing/drop/a": 0.6,
        "shapley/drop/a": 0.1,
        "probe/joint.a": 0.8,
        "expert_nll/a": 0.5,
    }
    assert not math.isnan(flat["full/acc"])


def test_train_fractions_run_every_config_at_each_and_tabulate_the_largest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "risk"
    args = ["compare", CONFIGS[0], "--seeds", "0", "--out", str(out), "--evaluate"]
    args += ["--train_fractions", "1.0", "0.25", "--set", "trainer.max_epochs=1"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    results = read(out / "results.csv")
    assert [r.get("train_fraction") or "1.0" for r in results] == ["0.25", "1.0"]
    n_small = json.loads(Path(results[0]["evaluation"]).read_text())
    assert n_small["impute_mean_source"].endswith("(its checkpoint)")
    (entry,) = [e for e in read(out / "summary.csv") if e["metric"] == "test/acc"]
    assert entry["n"] == "1" and float(entry["mean"]) == pytest.approx(
        float(results[1]["test/acc"])
    )
    assert "train_fraction 0.25" in capsys.readouterr().out
    assert (out / "risk.png").is_file()
    with pytest.raises(SystemExit) as bad:
        main([*args[:-5], "--train_fractions", "0", "--out", str(tmp_path / "x")])
    assert bad.value.code == 2
    assert "--train_fractions [0.0]" in capsys.readouterr().err


# ---- the probe gap from hand-made evaluations ---------------------------------------------------
def evaluated(strategy: str, seed: int, mode: str | None = None, **probes: float) -> dict:
    saved: dict[str, object] = {"strategy": strategy, "probes": []}
    if mode:
        saved["mode"] = mode
    saved["probes"] = [{"encoder": e.replace("__", "."), "probe_acc": v} for e, v in probes.items()]
    label = {"IntraOnly": "alone", "InterOnly": "joint"}.get(strategy, strategy.lower())
    if mode == "joint":
        label = "intra_joint"
    return {"strategy": label, "seed": seed, "saved": saved}


def test_the_probe_gap_reads_below_none_and_above() -> None:
    alone = [0.80, 0.82, 0.79, 0.81, 0.80]
    runs = [
        evaluated("IntraOnly", s, "independent", experts__a=0.9, experts__b=v)
        for s, v in enumerate(alone)
    ]
    # joint: b 4 points below (with spread), a the same as alone
    runs += [
        evaluated("InterOnly", s, joint__a=0.9, joint__b=v - 0.04 + 0.002 * (s % 2))
        for s, v in enumerate(alone)
    ]
    # I2M2: the joint encoder is read (its expert of b is as good as alone's, the joint one worse)
    runs += [
        evaluated(
            "I2M2", s, joint__a=0.9, joint__b=v - 0.1 + 0.001 * s, experts__a=0.9, experts__b=v
        )
        for s, v in enumerate(alone)
    ]
    # a strategy with `encoders.<m>` (MLA), above alone on b
    runs += [
        evaluated("MLA", s, encoders__a=0.9, encoders__b=v + 0.03 - 0.001 * s)
        for s, v in enumerate(alone)
    ]
    ref, rows = probe_gap(runs, ["joint", "alone", "i2m2", "mla"])
    assert ref == "alone"
    by = {(r["strategy"], r["modality"]): r for r in rows}
    assert list(by) == [(s, m) for s in ("joint", "i2m2", "mla") for m in ("a", "b")]
    assert by[("i2m2", "b")]["encoder"] == "joint.b" and by[("mla", "b")]["encoder"] == "encoders.b"
    d = [-0.04 + 0.002 * (s % 2) for s in range(5)]
    assert by[("joint", "b")]["diff"] == pytest.approx(sum(d) / 5)
    assert by[("joint", "b")]["diff_ci_high"] < 0
    assert by[("joint", "b")]["reading"].startswith(
        "joint leaves modality b's encoder (joint.b) 3.9 points below the encoder trained alone"
    )
    assert "95% CI [-" in by[("joint", "b")]["reading"]
    assert by[("joint", "a")]["diff"] == pytest.approx(0.0)
    assert "no measurable gap" in by[("joint", "a")]["reading"]
    assert by[("i2m2", "b")]["diff"] == pytest.approx(-0.1 + 0.002)
    assert "above the encoder trained alone" in by[("mla", "b")]["reading"]
    assert by[("joint", "b")]["reference_probe"] == pytest.approx(sum(alone) / 5)
    table = gap_markdown(ref, rows, ["joint", "alone", "i2m2", "mla"])
    assert "| joint | b | `joint.b` | 0.7648 | 0.8040 | -0.0392 [" in table


def test_the_probe_gap_says_when_there_is_no_encoder_trained_alone() -> None:
    runs = [evaluated("InterOnly", s, joint__a=0.7) for s in range(2)]
    runs += [evaluated("IntraOnly", s, "joint", experts__a=0.8) for s in range(2)]
    ref, rows = probe_gap(runs, ["joint", "intra_joint"])
    assert ref is None and rows == []  # IntraOnly mode: joint is not trained alone
    assert "no IntraOnly run with `mode: independent`" in gap_markdown(ref, rows, ["joint"])
    one = [evaluated("IntraOnly", 0, "independent", experts__a=0.8)]
    ref, rows = probe_gap(one + [evaluated("InterOnly", 0, joint__a=0.7)], ["joint", "alone"])
    assert ref == "alone" and rows[0]["pairs"] == 1 and math.isnan(rows[0]["diff_ci_low"])
    assert "from 1 seed: no interval" in rows[0]["reading"]
    ref, rows = probe_gap(one + [evaluated("InterOnly", 5, joint__a=0.7)], ["joint", "alone"])
    assert rows[0]["pairs"] == 0 and "no gap measured" in rows[0]["reading"]
    assert "| joint | a | `joint.a` | 0.7000 | n/a | n/a | 0 | n/a |" in gap_markdown(ref, rows, [])


def test_the_probe_gap_refuses_a_reference_trained_on_other_data() -> None:
    # an encoder trained alone on 6 views is no reference for one trained on 2
    runs = [
        evaluated("IntraOnly", s, "independent", experts__a=0.8) | {"data": "M(views=[a, b, c])"}
        for s in range(3)
    ]
    runs += [
        evaluated("InterOnly", s, joint__a=0.7) | {"data": "M(views=[a, b])"} for s in range(3)
    ]
    ref, rows = probe_gap(runs, ["joint", "alone"])
    assert ref == "alone" and len(rows) == 1
    assert rows[0]["pairs"] == 0 and math.isnan(rows[0]["diff"])
    assert rows[0]["reading"] == (
        "joint's encoder of modality a: not compared: the reference alone was trained on other "
        "data (M(views=[a, b, c]), not M(views=[a, b]))."
    )
    same = [r | {"data": "M(views=[a, b])"} for r in runs]  # the same data: compared
    _, rows = probe_gap(same, ["joint", "alone"])
    assert rows[0]["pairs"] == 3 and rows[0]["diff"] == pytest.approx(-0.1)
