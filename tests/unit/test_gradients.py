"""Combining rules, tested by their mathematical properties (METHODS.md sections 5 and 6)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmlearn.gradients import MGDA, BOGCCalibration, Sum, calibrate, ds_combine, fused_opinion
from mmlearn.gradients.bogc import evidence


def rows(n: int, p: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sum() -> None:
    g = rows(3)
    assert torch.allclose(Sum()(g), g.sum(0))


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_mgda_min_norm_properties(n: int, seed: int) -> None:
    g = rows(n, seed=seed)
    d, w = MGDA().combine(g)
    # in the convex hull of the rows
    assert (w >= -1e-9).all() and abs(float(w.sum()) - 1) < 1e-9
    assert torch.allclose(d, w @ g)
    # a common descent direction: no row has a negative inner product with it
    assert ((g @ d) >= -1e-6 * d.norm() ** 2).all()
    # minimal norm: no random point of the hull is shorter
    for _ in range(200):
        v = torch.rand(n, dtype=torch.float64)
        v /= v.sum()
        assert float((v @ g).norm()) >= float(d.norm()) - 1e-6
    # permutation invariant
    for perm in itertools.islice(itertools.permutations(range(n)), 6):
        assert torch.allclose(MGDA()(g[list(perm)]), d, atol=1e-6)


def test_mgda_two_objectives_closed_form_and_edge_cases() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    d, w = MGDA().combine(torch.stack([g1, g2]))
    # min over a: |a g1 + (1-a) g2|^2 = a^2 + 4(1-a)^2 -> a = 0.8
    assert torch.allclose(w, torch.tensor([0.8, 0.2])) and torch.allclose(
        d, torch.tensor([0.8, 0.4])
    )
    same = torch.stack([g1, g1])
    assert torch.allclose(MGDA()(same), g1)
    opposed = torch.stack([g1, -g1])
    assert torch.allclose(MGDA()(opposed), torch.zeros(2), atol=1e-7)
    assert torch.allclose(MGDA(scale=2.0)(torch.stack([g1, g2])), 2 * d)


def test_bogc_equal_variances_give_the_plain_sum() -> None:
    g = rows(3)
    for var in (torch.full_like(g, 0.3), torch.zeros_like(g), torch.full_like(g, 1e6)):
        out, w = calibrate(g, var)
        assert torch.allclose(w, torch.full_like(g, 1 / 3))
        assert torch.allclose(out, g.sum(0))


def test_bogc_lower_variance_gets_more_weight_per_dimension() -> None:
    g = rows(2, p=4)
    var = torch.tensor([[0.1, 1.0, 1.0, 5.0], [1.0, 0.1, 1.0, 0.5]], dtype=torch.float64)
    _, w = calibrate(g, var)
    assert w[0, 0] > w[1, 0] and w[1, 1] > w[0, 1] and w[1, 3] > w[0, 3]
    assert torch.allclose(w[:, 2], torch.full((2,), 0.5, dtype=torch.float64))
    # by hand: precisions [[10, 1, 1, 0.2], [1, 10, 1, 2]] (mean 3.275); dimension 0 has
    # evidence e = [10, 1] / 3.275, S + 1 = 1 + 11 / 3.275, w_k = (e_k + 1/2) / (S + 1)
    s1 = 1 + 11 / 3.275
    expected = torch.tensor([(10 / 3.275 + 0.5) / s1, (1 / 3.275 + 0.5) / s1], dtype=torch.float64)
    assert torch.allclose(w[:, 0], expected, atol=1e-6)  # ~ [0.8152, 0.1848]


def test_bogc_closed_form_equals_pairwise_ds_fusion() -> None:
    n, p = 4, 6
    e = evidence(torch.rand(n, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    b_closed, u_closed = fused_opinion(e)
    # simple-support opinion of objective k: belief e_k/(e_k+1) on singleton k, the rest uncertain
    beliefs = [torch.zeros(n, p, dtype=torch.float64) for _ in range(n)]
    for k in range(n):
        beliefs[k][k] = e[k] / (e[k] + 1)
    b, u = beliefs[0], 1 / (e[0] + 1)
    for k in range(1, n):
        b, u = ds_combine(b, u, beliefs[k], 1 / (e[k] + 1))
    assert torch.allclose(b, b_closed) and torch.allclose(u, u_closed)
    assert torch.allclose(b.sum(0) + u, torch.ones(p, dtype=torch.float64))


def test_bogc_is_finite_for_zero_variance_and_zero_gradients() -> None:
    zeros = torch.zeros(2, 5)
    out, w = calibrate(zeros, zeros)
    assert torch.isfinite(out).all() and torch.isfinite(w).all() and out.abs().max() == 0
    g = rows(2, p=5).float()
    var = torch.tensor([[0.0] * 5, [1.0] * 5])
    out, w = calibrate(g, var)
    assert torch.isfinite(out).all() and (w[0] > w[1]).all()


def test_bogc_ema_variance_by_hand_with_beta_0_9() -> None:
    rule = BOGCCalibration(beta=0.9)
    g = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]]), torch.tensor([[0.0, 5.0]])]
    for t, row in enumerate(g):
        var = rule.ema_variance(row.double(), "enc")
        # weights 0.9^(t-i) on the rows so far; variance of the weighted history
        w = torch.tensor([0.9 ** (t - i) for i in range(t + 1)], dtype=torch.float64)
        hist = torch.cat(g[: t + 1]).double()
        mean = (w[:, None] * hist).sum(0) / w.sum()
        expected = (w[:, None] * (hist - mean) ** 2).sum(0) / w.sum()
        assert torch.allclose(var[0], expected, atol=1e-12), t
    # step 2 by hand, first coordinate: weights (0.9, 1) on (1, 3): mean 2.0526..., var 0.9972...
    assert float(BOGCCalibration(beta=0.9).ema_variance(g[0], "a")[0, 0]) == 0.0
    two = BOGCCalibration(beta=0.9)
    two.ema_variance(g[0], "a")
    assert float(two.ema_variance(g[1], "a")[0, 0]) == pytest.approx(0.9 * 1.0 / 1.9**2 * 4)


def test_bogc_ema_estimator() -> None:
    rule = BOGCCalibration(beta=0.5)
    g1 = rows(2, seed=1)
    # first step: zero variance everywhere -> the plain sum
    assert torch.allclose(rule(g1, "enc"), g1.sum(0))
    noisy = torch.stack([g1[0], -g1[1]])  # objective 1 flips sign: high variance
    out, w = rule.combine(noisy, "enc")
    assert (w[0] >= w[1]).all() and (w[0] > w[1]).any()
    # state is kept per group; a new group starts fresh
    assert torch.allclose(rule(noisy, "other"), noisy.sum(0))
    # a single objective passes through
    assert torch.allclose(rule(g1[:1], "head"), g1[0])


def random_rows(n: int, g: torch.Generator) -> torch.Tensor:
    """Rows in a random dimension (often < n: singular Gramians), with opposed, collinear,
    duplicated and zero rows planted at random."""
    p = int(torch.randint(1, 9, (1,), generator=g))
    r = torch.randn(n, p, generator=g, dtype=torch.float64)
    for i in range(1, n):
        kind = int(torch.randint(0, 6, (1,), generator=g))
        j = int(torch.randint(0, i, (1,), generator=g))
        c = float(torch.rand(1, generator=g, dtype=torch.float64)) * 2 + 0.1
        if kind == 0:
            r[i] = -c * r[j]  # opposed
        elif kind == 1:
            r[i] = c * r[j]  # collinear
        elif kind == 2:
            r[i] = r[j]  # duplicate
        elif kind == 3 and i == n - 1:
            r[i] = 0.0
    return r * 10 ** float(torch.randint(-4, 4, (1,), generator=g))


def test_min_norm_is_exact_on_1000_random_and_degenerate_cases() -> None:
    from scipy.optimize import minimize

    from mmlearn.gradients import min_norm_weights

    g = torch.Generator().manual_seed(123)
    for case in range(1000):
        n = 2 + case % 5
        r = random_rows(n, g)
        gram = r @ r.T
        w = min_norm_weights(gram)
        val = float(w @ gram @ w)
        scale = float(gram.diagonal().max())
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-9, case
        # optimality certificate over the simplex: no vertex direction descends
        assert float((gram @ w).min()) >= val - 1e-7 * scale, case
        if case % 10 == 0:  # and an independent solver finds nothing lower
            G = gram.numpy()
            res = minimize(
                lambda v, G=G: v @ G @ v,
                torch.full((n,), 1 / n, dtype=torch.float64).numpy(),
                jac=lambda v, G=G: 2 * G @ v,
                bounds=[(0, 1)] * n,
                constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
                method="SLSQP",
                options={"ftol": 1e-15, "maxiter": 500},
            )
            assert val <= float(res.fun) + 1e-7 * scale, case


def test_min_norm_finds_zero_on_an_opposed_face() -> None:
    from mmlearn.gradients import min_norm_weights

    h = torch.tensor([0.3, 1.0, -0.2], dtype=torch.float64)
    u = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    r = torch.stack([u, -0.4 * u, h])  # u and -0.4u: the hull contains the origin
    w = min_norm_weights(r @ r.T)
    assert float((w @ r).norm()) < 1e-9
    assert torch.allclose(w, torch.tensor([0.4 / 1.4, 1 / 1.4, 0.0], dtype=torch.float64))


def test_frank_wolfe_for_many_objectives_reaches_the_exact_minimum() -> None:
    from mmlearn.gradients.mgda import _exact_small, min_norm_weights

    # Frank-Wolfe (more than 8 objectives) converges sublinearly: close to, not at, the minimum
    for seed in range(3):
        r = torch.randn(10, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        gram = r @ r.T
        exact = _exact_small(gram)
        fw = min_norm_weights(gram)
        assert (fw >= 0).all() and abs(float(fw.sum()) - 1) < 1e-9
        uniform, best = float(gram.mean()), float(exact @ gram @ exact)
        # it achieves all but 2% of the possible decrease from its uniform start
        assert uniform - float(fw @ gram @ fw) >= 0.98 * (uniform - best) > 0


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_min_norm_weights_keep_the_gramians_dtype(n: int) -> None:
    from mmlearn.gradients import min_norm_weights

    r = torch.randn(n, 4, generator=torch.Generator().manual_seed(n))
    w = min_norm_weights(r @ r.T)
    assert w.dtype == torch.float32 and w.shape == (n,)
    assert abs(float(w.sum()) - 1) < 1e-5


def test_reduced_ds_rule_on_general_opinions_by_hand() -> None:
    # two opinions over two classes (Han et al., ICLR 2021): conflict C = 0.5*0.4 + 0.2*0.4
    b1, u1 = torch.tensor([[0.5], [0.2]]), torch.tensor([0.3])
    b2, u2 = torch.tensor([[0.4], [0.4]]), torch.tensor([0.2])
    b, u = ds_combine(b1, u1, b2, u2)
    scale = 1 / (1 - 0.28)
    expected = torch.tensor([[0.2 + 0.1 + 0.12], [0.08 + 0.04 + 0.12]]) * scale
    torch.testing.assert_close(b, expected)
    torch.testing.assert_close(u, torch.tensor([0.06 * scale]))
    torch.testing.assert_close(b.sum(0) + u, torch.ones(1))


def test_evidence_is_capped_and_uses_the_documented_eps() -> None:
    var = torch.ones(1, 3001, dtype=torch.float64)
    var[0, 0] = 0.0  # a dead coordinate: precision 1/eps = 1e8
    e = evidence(var)
    mean = (1e8 + 3000 / (1 + 1e-8)) / 3001
    assert float(e[0, 0]) == 1000.0  # e_max: 1e3 by default
    assert float(e[0, 1]) == pytest.approx(1 / (1 + 1e-8) / mean, rel=1e-9)
    assert float(evidence(var, e_max=5e3)[0, 0]) == pytest.approx(1e8 / mean, rel=1e-9)
    # calibrate passes the cap on: weights from capped evidence
    mu = torch.ones(2, 3001, dtype=torch.float64)
    var2 = torch.cat([var, torch.ones_like(var)])
    _, w = calibrate(mu, var2)
    e2 = evidence(var2)
    assert float(e2[0, 0]) == 1000.0
    assert float(w[0, 0]) == pytest.approx((1000 + 0.5) / (1000 + float(e2[1, 0]) + 1))
    _, w_rule = BOGCCalibration().combine(mu, "g", var2)
    torch.testing.assert_close(w_rule, w)


def test_bogc_rule_defaults_and_beta_range() -> None:
    rule = BOGCCalibration()
    assert (rule.beta, rule.eps, rule.e_max) == (0.9, 1e-8, 1e3)
    BOGCCalibration(beta=0.0)  # no memory: allowed
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"BOGC: beta={bad}; expected 0 <= beta < 1"):
            BOGCCalibration(beta=bad)


def test_rules_called_directly_pass_the_variance_and_keep_dtype() -> None:
    g = rows(2, p=1)  # two objectives, ONE dimension
    var = torch.tensor([[0.1], [1.0]], dtype=torch.float64)
    out = BOGCCalibration()(g, "enc", var)
    torch.testing.assert_close(out, calibrate(g, var)[0])
    assert not torch.allclose(out, g.sum(0))  # calibrated, not summed
    _, w = Sum().combine(rows(3, p=5))
    assert w.dtype == torch.float64 and w.tolist() == [1.0, 1.0, 1.0]


def test_bogc_rule_state_round_trips() -> None:
    a, b = BOGCCalibration(beta=0.8), BOGCCalibration(beta=0.8)
    for seed in range(3):
        a(rows(2, seed=seed), "enc")
    b.load_state_dict(a.state_dict(), torch.device("cpu"))
    state = a.state_dict()["state"]
    assert set(state) == {"enc"} and state["enc"][2] == pytest.approx(1 + 0.8 + 0.64)
    nxt = rows(2, seed=9)
    torch.testing.assert_close(b(nxt, "enc"), a(nxt, "enc"))
    fresh = BOGCCalibration(beta=0.8)
    fresh.load_state_dict({}, None)
    assert fresh.state == {}


def test_mgda_normalize_solves_on_unit_rows_and_weights_the_original_ones() -> None:
    g1 = torch.tensor([3.0, 0.0], dtype=torch.float64)  # |g1| = 3
    g2 = torch.tensor([0.0, 0.5], dtype=torch.float64)  # |g2| = 0.5
    d, w = MGDA(normalize=True).combine(torch.stack([g1, g2]))
    # unit rows e1 and e2 are orthogonal and of equal length: min-norm weights (1/2, 1/2)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(d, 0.5 * g1 + 0.5 * g2)
    # without normalisation the short row dominates: w1 = |g2|^2 / |g1 - g2|^2
    _, w_plain = MGDA().combine(torch.stack([g1, g2]))
    assert float(w_plain[0]) == pytest.approx(0.25 / 9.25)
    # a zero row stays finite: its unit row is 0, so it takes all the weight
    d0, w0 = MGDA(normalize=True).combine(torch.stack([g1, torch.zeros(2, dtype=torch.float64)]))
    assert torch.isfinite(d0).all() and w0.tolist() == [0.0, 1.0] and d0.abs().max() == 0


def test_frank_wolfe_stops_at_an_optimal_vertex_and_on_identical_rows() -> None:
    from mmlearn.gradients import min_norm_weights

    r = torch.zeros(10, 2, dtype=torch.float64)
    r[0, 0], r[1:, 0] = 0.01, 1.0  # the best point is vertex 0; the line search overshoots it
    w = min_norm_weights(r @ r.T)
    assert w.tolist() == [1.0] + [0.0] * 9
    same = torch.ones(10, 3, dtype=torch.float64)
    w_same = min_norm_weights(same @ same.T)
    assert w_same is not None and torch.allclose(
        w_same, torch.full((10,), 0.1, dtype=torch.float64)
    )


def test_ds_rule_keeps_dimensions_apart_and_the_cap_is_passed_on() -> None:
    b1 = torch.tensor([[0.5, 0.1], [0.2, 0.6]])
    b2 = torch.tensor([[0.4, 0.3], [0.4, 0.3]])
    u1, u2 = 1 - b1.sum(0), 1 - b2.sum(0)
    b, u = ds_combine(b1, u1, b2, u2)
    for j in range(2):  # each dimension fused on its own
        bj, uj = ds_combine(b1[:, j : j + 1], u1[j : j + 1], b2[:, j : j + 1], u2[j : j + 1])
        torch.testing.assert_close(b[:, j], bj[:, 0])
        torch.testing.assert_close(u[j], uj[0])
    var = torch.ones(2, 3001, dtype=torch.float64)
    var[0, 0] = 0.0
    mu = torch.ones_like(var)
    _, w_low = calibrate(mu, var)  # evidence capped at 1e3
    _, w_high = calibrate(mu, var, e_max=1e9)
    _, w_rule = BOGCCalibration(e_max=1e9).combine(mu, "g", var)
    assert 1 - float(w_low[0, 0]) > 3 * (1 - float(w_high[0, 0]))  # the cap bites
    torch.testing.assert_close(w_rule, w_high)


def test_frank_wolfe_stops_when_the_line_search_step_is_zero() -> None:
    from mmlearn.gradients import min_norm_weights

    r = torch.ones(10, 2, dtype=torch.float64)
    r[9, 1] = 0.0  # [1, 0] is the min-norm point; every row has the same product with it
    w = min_norm_weights(r @ r.T)
    assert w is not None
    torch.testing.assert_close(w, torch.eye(10, dtype=torch.float64)[9], atol=1e-12, rtol=0)


def test_eight_objectives_are_solved_exactly() -> None:
    from mmlearn.gradients import min_norm_weights

    r = torch.randn(8, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    r[5] = -0.3 * r[2]  # a degenerate face: Frank-Wolfe would stop short of 0
    w = min_norm_weights(r @ r.T)
    assert float((w @ r).norm()) < 1e-9


@pytest.mark.parametrize("n", [1, 2, 3])
def test_min_norm_weights_keep_float64(n: int) -> None:
    from mmlearn.gradients import min_norm_weights

    same = torch.ones(n, 4, dtype=torch.float64)  # identical rows: the two-objective tie too
    w = min_norm_weights(same @ same.T)
    assert w.dtype == torch.float64 and abs(float(w.sum()) - 1) < 1e-12


def test_mgda_normalize_scales_rows_not_columns() -> None:
    g = torch.tensor([[3.0, 0.0, 4.0], [0.0, 1.0, 0.0]], dtype=torch.float64)  # norms 5 and 1
    d, w = MGDA(normalize=True).combine(g)
    # unit rows [0.6, 0, 0.8] and [0, 1, 0] are orthogonal: weights (1/2, 1/2)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(d, 0.5 * g[0] + 0.5 * g[1])
