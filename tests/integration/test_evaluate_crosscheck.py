"""``evaluate`` checked against references written from its definitions (docs/evaluation.md).

Each reference uses only the strategies' sub-modules and plain torch: the missing-modality rows
(impute_mean, impute_zero, feature_zero, drop), the class prior, Shapley values by averaging over
permutations, and a Lightning ``trainer.test`` whose batches mark a modality absent.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers import Given, quiet_trainer
from mmlearn.batch import collate_multimodal
from mmlearn.data import SyntheticMultimodal
from mmlearn.data.base import Split, SplitDataset
from mmlearn.evaluation.evaluate import evaluate
from mmlearn.strategies import I2M2, InterOnly, IntraOnly, LateFusionHeads

TOL = 1e-5
SMALL = {"n_train": 300, "n_val": 50, "n_test": 200}
SEMANTICS = ("impute_mean", "impute_zero", "feature_zero", "drop")


def scores(logp: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """acc, macro-F1, NLL, Brier, ECE (15 equal-width bins, top label) of ``logp [N, K]``."""
    logp = logp.double()
    p, k, n = logp.exp(), logp.shape[1], len(y)
    pred = p.argmax(1)
    correct = (pred == y).double()
    f1s = []
    for c in range(k):
        tp = ((pred == c) & (y == c)).sum().item()
        fp, fn = ((pred == c) & (y != c)).sum().item(), ((pred != c) & (y == c)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    conf = p.max(1).values
    bins = (conf * 15).floor().long().clamp(0, 14)
    ece = sum(
        abs(correct[bins == b].mean() - conf[bins == b].mean()).item() * int((bins == b).sum()) / n
        for b in range(15)
        if (bins == b).any()
    )
    return {
        "acc": correct.mean().item(),
        "f1": sum(f1s) / k,
        "nll": -logp.gather(1, y[:, None]).mean().item(),
        "brier": ((p - F.one_hot(y, k).double()) ** 2).sum(1).mean().item(),
        "ece": ece,
    }


def outputs(model, x, zero=()):
    """Logits of every expert, the features of the modalities in ``zero`` zeroed."""
    out = {}
    if hasattr(model, "joint"):
        feats = {m: enc(x[m]) for m, enc in model.joint.encoders.items()}
        feats = {m: torch.zeros_like(f) if m in zero else f for m, f in feats.items()}
        out["fused"] = model.joint.head(model.joint.fusion(feats))
    for m, e in getattr(model, "experts", {}).items():
        f = e.encoder(x[m])
        out[m] = e.head(torch.zeros_like(f) if m in zero else f)
    return out


def rule(model, out, keep):
    """The strategy's prediction with the experts of the modalities ``keep`` (written out)."""
    if isinstance(model, (InterOnly, LateFusionHeads)):
        return F.log_softmax(out["fused"], -1)
    terms = [F.log_softmax(out[m], -1) for m in keep]
    if isinstance(model, I2M2) and (
        model.missing_joint == "impute" or len(keep) == len(model.modalities)
    ):
        terms.append(F.log_softmax(out["fused"], -1))
    s = torch.stack(terms).sum(0)
    if isinstance(model, IntraOnly) and model.mode == "independent" and model.divide_prior:
        s = s - (len(keep) - 1) * model.prior_logits
    return F.log_softmax(s, -1)


def reference(model, dm, semantics, present):
    """log p [N, K] of the row (semantics, present) on the test split."""
    test, train = dm.splits["test"], dm.splits["train"]
    x = {m: v.float() for m, v in test.inputs.items()}
    absent = [m for m in model.modalities if m not in present]
    mean = {m: train.inputs[m].float().mean(0).expand_as(x[m]) for m in absent}
    with torch.no_grad():
        if semantics == "impute_zero":
            xi = x | {m: torch.zeros_like(x[m]) for m in absent}
            return rule(model, outputs(model, xi), model.modalities)
        if semantics == "impute_mean":
            return rule(model, outputs(model, x | mean), model.modalities)
        if semantics == "feature_zero":
            return rule(model, outputs(model, x, absent), model.modalities)
        return rule(model, outputs(model, x | mean), [m for m in model.modalities if m in present])


def every_subset(mods):
    return [c for r in range(1, len(mods) + 1) for c in itertools.combinations(mods, r)]


def check_rows(model, dm, result, semantics=SEMANTICS):
    y = dm.splits["test"].target
    for s in semantics:
        for subset in every_subset(model.modalities):
            row = result.row(s, subset)
            assert row["size"] == len(subset)
            if s == "drop" and not model.drops_experts:
                assert row.get("note") and "acc" not in row, row
                continue
            want = scores(reference(model, dm, s, subset), y)
            for key, value in want.items():
                assert row[key] == pytest.approx(value, abs=TOL), (s, subset, key, row)


def prior_scores(dm):
    train, y = dm.splits["train"].target, dm.splits["test"].target
    freq = torch.bincount(train, minlength=dm.num_classes).double() / len(train)
    return scores(freq.log().expand(len(y), -1), y)


def check_prior_and_shapley(model, dm, result, metric):
    prior = prior_scores(dm)
    for key, value in prior.items():
        assert result.prior[key] == pytest.approx(value, abs=TOL), key
    mods, n = model.modalities, math.factorial(len(model.modalities))
    sems = [s for s in SEMANTICS if s != "drop" or model.drops_experts]
    assert set(result.shapley) == set(sems)
    for s in sems:

        def v(t, s=s):
            return prior[metric] if not t else result.row(s, list(t))[metric]

        phi = dict.fromkeys(mods, 0.0)
        for order in itertools.permutations(mods):
            for i, m in enumerate(order):
                phi[m] += (v(order[: i + 1]) - v(order[:i])) / n
        for m in mods:
            assert result.shapley[s][m] == pytest.approx(phi[m], abs=1e-6), (s, m)


def build(cls, dm, epochs=0, seed=0, **kw):
    dm.setup("fit")
    torch.manual_seed(seed)
    model = cls(input_shapes=dm.input_shapes, num_classes=dm.num_classes, embed_dim=8, **kw)
    if epochs:
        quiet_trainer(max_epochs=epochs).fit(model, datamodule=dm)
    return model.eval()


def offset_data(batch_size=37):
    """a: informative; b, c: noise; every input's training mean far from 0; classes unbalanced."""
    g = torch.Generator().manual_seed(1)
    embed = 3 * torch.randn(3, 4, generator=g)

    def split(n):
        y = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, True, generator=g)
        a = F.one_hot(y, 3).float() @ embed + 6
        a = a + 0.3 * torch.randn(n, 4, generator=g)
        b = torch.randn(n, 6, generator=g) * 2 - 7
        c = torch.randn(n, 2, generator=g) + 12
        return Split({"a": a, "b": b, "c": c}, y)

    return Given(
        {"train": split(300), "val": split(50), "test": split(200)}, k=3, batch_size=batch_size
    )


def synthetic(m, dims, batch_size=37):
    noise = [0.3, 1.0, 3.0, 2.0][:m]
    options = {"num_classes": 3, "inter": 0.5, "seed": 3, "batch_size": batch_size} | SMALL
    return SyntheticMultimodal(num_modalities=m, dim=dims, noise=noise, **options)


DATA = {
    "3mod": lambda: synthetic(3, [5, 9, 3]),
    "4mod": lambda: synthetic(4, [5, 9, 3, 7]),
    "offset": offset_data,
    "offset53": lambda: offset_data(53),
}
#: id -> (data, strategy, epochs (0: random weights), options, Shapley metric)
CASES = {
    "inter_lrtf_linear": ("3mod", InterOnly, 2, {"fusion": "lrtf", "head_hidden": 0}, "acc"),
    "inter_sum_random": ("offset", InterOnly, 0, {"fusion": "sum"}, "brier"),
    "intra_independent": ("4mod", IntraOnly, 2, {"mode": "independent"}, "nll"),
    "intra_joint": ("offset", IntraOnly, 1, {"mode": "joint"}, "acc"),
    "i2m2_impute_sum": ("offset53", I2M2, 1, {"fusion": "sum", "head_hidden": 0}, "acc"),
    "i2m2_drop_lrtf": ("3mod", I2M2, 2, {"missing_joint": "drop", "fusion": "lrtf"}, "f1"),
    "late_fusion_random": ("offset", LateFusionHeads, 0, {"fusion": "lrtf"}, "ece"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rows_prior_and_shapley_match_the_definitions(case: str) -> None:
    data, cls, epochs, kw, metric = CASES[case]
    dm = DATA[data]()
    model = build(cls, dm, epochs, **kw)
    result = evaluate(model, dm, metric=metric, probes=False)
    assert result.metric == metric
    check_rows(model, dm, result)
    check_prior_and_shapley(model, dm, result, metric)


def test_chosen_subsets_are_those_and_the_full_set_without_shapley() -> None:
    dm = synthetic(3, [5, 9, 3], batch_size=41)
    model = build(IntraOnly, dm, 0, mode="joint")
    result = evaluate(
        model, dm, missing=["drop", "feature_zero"], subsets=[["m2"], ["m2", "m0"]], probes=False
    )
    got = sorted((r["semantics"], r["subset"]) for r in result.rows)
    names = ["m0+m1+m2", "m0+m2", "m2"]
    assert got == sorted((s, n) for s in ["drop", "feature_zero"] for n in names)
    assert result.shapley == {}
    y = dm.splits["test"].target
    for s in ["drop", "feature_zero"]:
        for subset in (["m2"], ["m0", "m2"]):
            want = scores(reference(model, dm, s, subset), y)
            assert result.row(s, subset)["acc"] == pytest.approx(want["acc"], abs=TOL)
            assert result.row(s, subset)["nll"] == pytest.approx(want["nll"], abs=TOL)


def test_probes_are_above_chance_for_the_informative_modality() -> None:
    dm = offset_data()
    model = build(I2M2, dm, 1)
    result = evaluate(model, dm, missing=["impute_mean"], subsets=[["a"]], probes=True)
    assert len(result.probes) == 6  # 3 joint and 3 unimodal encoders
    majority = float(torch.bincount(dm.splits["test"].target).max()) / 200
    for kind in ("joint", "experts"):
        acc = {
            p["modality"]: p["probe_acc"] for p in result.probes if p["encoder"].startswith(kind)
        }
        assert majority + 0.2 < acc["a"] <= 1.0
        assert acc["a"] > acc["b"] and acc["a"] > acc["c"]
        assert all(0.0 <= v <= 1.0 for v in acc.values())


def lightning_test(model, dm, present):
    """trainer.test on the test split, batches of 37 marking the modalities not in ``present``."""

    def collate(samples):
        batch = collate_multimodal(samples)
        batch.present = {m: torch.full((batch.size,), m in present) for m in model.modalities}
        return batch

    loader = DataLoader(SplitDataset(dm.splits["test"]), batch_size=37, collate_fn=collate)
    (out,) = quiet_trainer().test(model, dataloaders=loader, verbose=False)
    return out


@pytest.mark.parametrize(
    ("cls", "kw", "semantics"),
    [
        (IntraOnly, {"mode": "independent"}, "drop"),
        (IntraOnly, {"mode": "joint"}, "drop"),
        (I2M2, {"missing_joint": "drop", "fusion": "lrtf"}, "drop"),
        (InterOnly, {"fusion": "sum", "head_hidden": 0}, "impute_zero"),
    ],
    ids=["intra_independent", "intra_joint", "i2m2_drop", "inter_only"],
)
def test_lightning_test_with_absent_modalities_matches_the_row(cls, kw, semantics) -> None:
    dm = synthetic(3, [5, 9, 3])
    model = build(cls, dm, 1, **kw)
    result = evaluate(model, dm, missing=[semantics], subsets=[["m1"], ["m0", "m2"]], probes=False)
    for present in (["m1"], ["m0", "m2"]):
        out = lightning_test(model, dm, present)
        row = result.row(semantics, present)
        assert out["test/acc"] == pytest.approx(row["acc"], abs=TOL), present
        assert out["test/loss"] == pytest.approx(row["nll"], abs=TOL), present
