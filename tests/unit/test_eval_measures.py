"""Calibration measures, exact Shapley values and linear probes (mmlearn.evaluation).

References are computed independently: numpy loops over bins, hand-worked small examples,
brute force over all permutations, and the optimality condition of the probe's objective.
"""

from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest
import torch

from mmlearn.errors import MMLearnError
from mmlearn.evaluation.calibration import calibration, plot_reliability, reliability
from mmlearn.evaluation.probes import fit_probe, probe_accuracy
from mmlearn.evaluation.shapley import shapley_values, subsets


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- calibration ---------------------------------------------------------------------------
def dirichlet_task(n: int = 20_000, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """True posteriors p ~ Dir(1) and labels y ~ Categorical(p)."""
    torch.manual_seed(0)
    p = torch.distributions.Dirichlet(torch.ones(k)).sample((n,))
    return p, torch.multinomial(p, 1, generator=gen(1)).squeeze(1)


def test_ece_of_the_true_posterior_is_small_and_of_an_overconfident_one_large() -> None:
    p, y = dirichlet_task()
    assert calibration(p.log(), y, multilabel=False)["ece"] <= 0.02
    sharp = torch.log_softmax(3 * p.log(), dim=1)  # p^3 renormalised
    assert calibration(sharp, y, multilabel=False)["ece"] >= 0.08


def test_multilabel_ece_of_the_true_posterior_is_small_and_of_an_overconfident_one_large() -> None:
    p = torch.rand(20_000, 3, generator=gen(2)).clamp(1e-4, 1 - 1e-4)
    y = torch.bernoulli(p, generator=gen(3)).long()
    assert calibration(p.log(), y, multilabel=True)["ece"] <= 0.02
    sharp = torch.nn.functional.logsigmoid(3 * torch.logit(p))
    assert calibration(sharp, y, multilabel=True)["ece"] >= 0.08


def numpy_ece(conf: np.ndarray, hit: np.ndarray, n_bins: int = 15) -> tuple[float, list[int]]:
    ece, counts = 0.0, []
    for b in range(n_bins):
        inside = (conf >= b / n_bins) & (conf < (b + 1) / n_bins)
        counts.append(int(inside.sum()))
        if inside.any():
            ece += inside.mean() * abs(hit[inside].mean() - conf[inside].mean())
    return ece, counts


@pytest.mark.parametrize("multilabel", [False, True])
def test_ece_and_reliability_equal_a_numpy_binning(multilabel: bool) -> None:
    z = torch.randn(1000, 5, generator=gen(4)) * 2
    if multilabel:
        log_probs = torch.nn.functional.logsigmoid(z)
        y = (torch.rand(1000, 5, generator=gen(5)) < 0.4).long()
        conf, hit = log_probs.exp().numpy().ravel(), y.numpy().ravel()
    else:
        log_probs = torch.log_softmax(z, dim=1)
        y = torch.randint(0, 5, (1000,), generator=gen(5))
        p = log_probs.exp().numpy()
        conf, hit = p.max(1), (p.argmax(1) == y.numpy())
    ece, counts = numpy_ece(conf.astype(np.float64), hit.astype(np.float64))
    assert ece > 0.05  # random labels: far from calibrated, so the check has something to match
    assert calibration(log_probs, y, multilabel)["ece"] == pytest.approx(ece, abs=1e-5)
    bins = reliability(log_probs, y, multilabel)
    assert bins["count"] == counts and len(bins["confidence"]) == 15
    n = sum(bins["count"])
    from_bins = sum(
        c / n * abs(a - f)
        for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
    )
    assert from_bins == pytest.approx(calibration(log_probs, y, multilabel)["ece"], abs=1e-5)


def test_brier_and_nll_by_hand() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64)
    out = calibration(p.log(), torch.tensor([0, 2, 2]), multilabel=False)
    # (0.3² + 0.2² + 0.1²) + (0.1² + 0.8² + 0.9²) + (0.3² + 0.3² + 0.6²) = 0.14 + 1.46 + 0.54
    assert out["brier"] == pytest.approx(2.14 / 3, abs=1e-6)
    assert out["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.1) + math.log(0.4)) / 3)
    assert "auroc" not in out and "auprc" not in out  # K = 3: no ranking measures

    q = torch.tensor([[0.9, 0.2], [0.6, 0.5]])
    out = calibration(q.log(), torch.tensor([[1, 0], [0, 1]]), multilabel=True)
    assert out["brier"] == pytest.approx((0.01 + 0.04 + 0.36 + 0.25) / 2, abs=1e-6)
    bce = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.5)) / 4
    assert out["nll"] == pytest.approx(bce, abs=1e-6)
    assert {"auroc", "auprc"} <= set(out)


def test_auroc_and_auprc_of_binary_rankings() -> None:
    p1 = torch.tensor([0.1, 0.3, 0.35, 0.6, 0.8, 0.9])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    log_probs = torch.stack([1 - p1, p1], dim=1).log()
    out = calibration(log_probs, y, multilabel=False)
    assert out["auroc"] == pytest.approx(1.0) and out["auprc"] == pytest.approx(1.0)
    out = calibration(log_probs, 1 - y, multilabel=False)  # the ranking reversed
    assert out["auroc"] == pytest.approx(0.0)
    # one swapped pair out of 9: AUROC 8/9; positives at ranks 1, 2, 4: AP = (1 + 1 + 3/4) / 3
    y = torch.tensor([0, 0, 1, 0, 1, 1])
    out = calibration(log_probs, y, multilabel=False)
    assert out["auroc"] == pytest.approx(8 / 9)
    assert out["auprc"] == pytest.approx((1 + 1 + 3 / 4) / 3)


def test_multilabel_auroc_is_the_macro_mean_over_labels_with_both_classes() -> None:
    p = torch.tensor([[0.9, 0.2, 0.5], [0.4, 0.7, 0.5], [0.6, 0.1, 0.5], [0.2, 0.8, 0.5]])
    y = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 0]])
    # label 0: the positive outranks all 3 negatives (1); label 1: negatives 0.2, 0.7 vs
    # positives 0.1, 0.8 -> 2 of 4 pairs (0.5); label 2 has no positive and is left out
    with pytest.warns(UserWarning, match=r"labels \[2\]"):
        out = calibration(p.log(), y, multilabel=True)
    assert out["auroc"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("log_probs", "target", "multilabel", "match"),
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), False, "N >= 1"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), False, r"shape \(4,\)"),
        (torch.full((4, 3), -1.1), torch.zeros(3, dtype=torch.long), False, r"shape \(3,\)"),
        (torch.full((2, 3), -1.1), torch.tensor([0, 3]), False, r"\[0, 3\].*\[0, 3\)"),
        (torch.full((2, 3), -1.1), torch.tensor([0, 1]), True, r"expected \[2, 3\]"),
        (torch.full((1, 2), -0.7), torch.tensor([[0, 2]]), True, "other than 0 and 1"),
        (torch.full((1, 2), 0.5), torch.tensor([1]), False, "values > 0"),
    ],
)
def test_bad_calibration_input_is_a_user_error(
    log_probs: torch.Tensor, target: torch.Tensor, multilabel: bool, match: str
) -> None:
    with pytest.raises(MMLearnError, match=match):
        calibration(log_probs, target, multilabel)


def test_plot_reliability_writes_a_png(tmp_path) -> None:
    p, y = dirichlet_task(2000)
    curves = {"true": (p.log(), y), "sharp": (torch.log_softmax(3 * p.log(), dim=1), y)}
    path = plot_reliability(curves, multilabel=False, path=tmp_path / "rel.png", title="t")
    assert path == tmp_path / "rel.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MMLearnError, match="no curves"):
        plot_reliability({}, multilabel=False, path=tmp_path / "x.png")


# ---- Shapley -------------------------------------------------------------------------------
def random_game(names: list[str], seed: int) -> tuple[dict[frozenset[str], float], float]:
    rng = random.Random(seed)
    return {frozenset(s): rng.uniform(0, 1) for s in subsets(names)}, rng.uniform(0, 0.2)


def test_subsets_are_ordered_by_size_then_modality_order() -> None:
    assert subsets(["a", "b", "c"]) == [
        ("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c"),
    ]  # fmt: skip
    assert len(subsets("abcdef")) == 63


@pytest.mark.parametrize("m", [3, 4, 6])
def test_shapley_values_are_efficient(m: int) -> None:
    names = [f"m{i}" for i in range(m)]
    values, empty = random_game(names, seed=m)
    phi = shapley_values(values, names, empty)
    assert list(phi) == names
    assert sum(phi.values()) == pytest.approx(values[frozenset(names)] - empty, abs=1e-12)


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_shapley_values_equal_the_mean_over_all_orders(m: int) -> None:
    names = [f"m{i}" for i in range(m)]
    values, empty = random_game(names, seed=10 + m)
    v = {**values, frozenset(): empty}
    brute = dict.fromkeys(names, 0.0)
    orders = list(itertools.permutations(names))
    for order in orders:
        for i, name in enumerate(order):
            before = frozenset(order[:i])
            brute[name] += (v[before | {name}] - v[before]) / len(orders)
    phi = shapley_values(values, names, empty)
    assert phi == pytest.approx(brute, abs=1e-12)


def test_symmetry_dummy_and_additive_games() -> None:
    names = ["a", "b", "c", "d"]

    def v(s: frozenset[str]) -> float:  # a, b interchangeable; d never matters
        pair = len(s & {"a", "b"})
        return 0.3 * pair + 0.1 * pair**2 + (0.25 if "c" in s else 0.0) * (1 + pair)

    phi = shapley_values({frozenset(s): v(frozenset(s)) for s in subsets(names)}, names, 0.0)
    assert phi["a"] == pytest.approx(phi["b"], abs=1e-15) and phi["a"] > 0
    assert phi["d"] == 0.0
    weights = {"a": 0.1, "b": -0.05, "c": 0.3}
    additive = {frozenset(s): sum(weights[x] for x in s) for s in subsets(list(weights))}
    assert shapley_values(additive, list(weights), 0.0) == pytest.approx(weights, abs=1e-15)


def test_bad_games_are_user_errors() -> None:
    values, _ = random_game(["a", "b", "c"], seed=0)
    del values[frozenset({"a", "c"})]
    with pytest.raises(MMLearnError, match=r"\[\['a', 'c'\]\]"):
        shapley_values(values, ["a", "b", "c"], 0.0)
    values, _ = random_game(["a", "b"], seed=0)
    with pytest.raises(MMLearnError, match=r"\['z'\]"):
        shapley_values({**values, frozenset({"z"}): 0.5}, ["a", "b"], 0.0)
    with pytest.raises(MMLearnError, match=r"\['a'\] are listed more than once"):
        shapley_values(values, ["a", "b", "a"], 0.0)
    with pytest.raises(MMLearnError, match="not finite"):
        shapley_values({**values, frozenset({"a"}): math.nan}, ["a", "b"], 0.0)


# ---- linear probes -------------------------------------------------------------------------
def clusters(n: int, k: int, d: int, seed: int, spread: float = 4.0) -> tuple[torch.Tensor, ...]:
    g = gen(seed)
    means = torch.randn(k, d, generator=gen(99)) * spread
    y = torch.randint(0, k, (n,), generator=g)
    return means[y] + torch.randn(n, d, generator=g) + 7.0, y  # offset: standardisation matters


def test_probe_separates_gaussian_clusters() -> None:
    (x, y), (xt, yt) = clusters(1000, 5, 16, seed=0), clusters(500, 5, 16, seed=1)
    assert probe_accuracy(x, y, xt, yt, num_classes=5) >= 0.95


def test_probe_on_features_independent_of_the_label_is_at_chance() -> None:
    x, xt = torch.randn(1500, 64, generator=gen(2)), torch.randn(1500, 64, generator=gen(3))
    y, yt = torch.randint(0, 10, (1500,), generator=gen(4)), torch.randint(0, 10, (1500,))
    assert abs(probe_accuracy(x, y, xt, yt, num_classes=10) - 0.1) <= 0.1


def test_probe_minimises_its_objective_and_is_deterministic() -> None:
    x, y = clusters(300, 3, 5, seed=5, spread=0.7)
    x[:, 2] = 3.0  # a constant feature: std 1, not a division by 0
    a, b = fit_probe(x, y, 3, l2=1e-2), fit_probe(x, y, 3, l2=1e-2)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # the gradient of mean CE + l2 ||W||^2, by hand in numpy, vanishes at the fitted weights
    xn = x.double().numpy()
    z = (xn - xn.mean(0)) / np.where(xn.std(0) > 0, xn.std(0), 1.0)
    logits = z @ a.weight.numpy() + a.bias.numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = (p - np.eye(3)[y.numpy()]) / len(xn)
    assert np.abs(z.T @ r + 2e-2 * a.weight.numpy()).max() < 1e-5
    assert np.abs(r.sum(0)).max() < 1e-5
    assert a.log_proba(x).exp().numpy() == pytest.approx(p, abs=1e-5)


def test_multilabel_probe() -> None:
    x = torch.randn(800, 8, generator=gen(6))
    y = (x[:, :3] + 0.1 * torch.randn(800, 3, generator=gen(7)) > 0).long()  # label k: x_k > 0
    probe = fit_probe(x[:600], y[:600], num_classes=3, multilabel=True)
    lp = probe.log_proba(x[600:])
    assert lp.shape == (200, 3) and bool((lp <= 0).all())
    assert probe.accuracy(x[600:], y[600:]) >= 0.9
    hand = ((lp.exp() > 0.5).long() == y[600:]).float().mean().item()
    assert probe.accuracy(x[600:], y[600:]) == pytest.approx(hand)


@pytest.mark.parametrize(
    ("features", "target", "match"),
    [
        (torch.randn(10), torch.zeros(10, dtype=torch.long), r"shape \(10,\)"),
        (torch.randn(10, 3), torch.zeros(9, dtype=torch.long), r"shape \(9,\).*10 feature rows"),
        (torch.full((10, 3), math.nan), torch.zeros(10, dtype=torch.long), "NaN"),
        (torch.randn(3, 3), torch.tensor([0, 1, 4]), r"\[0, 4\].*\[0, 4\)"),
        (torch.randn(3, 3), torch.tensor([0, -1, 2]), r"\[-1, 2\]"),
    ],
)
def test_bad_probe_input_is_a_user_error(
    features: torch.Tensor, target: torch.Tensor, match: str
) -> None:
    with pytest.raises(MMLearnError, match=match):
        fit_probe(features, target, num_classes=4)


def test_probe_of_other_width_is_a_user_error() -> None:
    x, y = clusters(50, 3, 4, seed=0)
    with pytest.raises(MMLearnError, match="5 columns, the probe 4"):
        fit_probe(x, y, 3).accuracy(torch.randn(50, 5), y)


def test_probe_timing() -> None:
    """Not asserted (machines differ): run with -s to see it. Budget: 6 probes in well < 30 s."""
    (x, y), (xt, yt) = clusters(1500, 10, 64, seed=8, spread=0.3), clusters(1500, 10, 64, seed=9)
    fit_probe(x, y, 10)  # warm-up
    start = time.perf_counter()
    accs = [probe_accuracy(x, y, xt, yt, 10) for _ in range(6)]
    each = (time.perf_counter() - start) / 6
    print(f"\nprobe 1500 x 64, 10 classes: {each * 1000:.0f} ms per fit (acc {accs[0]:.3f})")
