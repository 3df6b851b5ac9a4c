"""Combining rules (:mod:`mmlearn.gradients`), tested by their mathematical properties and
against independent computations: ``tests/reference.py`` (BOGC's pairwise Dempster-Shafer
weights) and scipy's SLSQP (MGDA's min-norm point). docs/methods.md sections 5 and 6.

The property tests run over :data:`mmlearn.gradients.RULES`: a rule added there is checked
without editing this file.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import Tensor

import mmlearn.gradients as gradients
from mmlearn.errors import MMLearnError
from mmlearn.gradients import (
    MGDA,
    RULES,
    Block,
    BOGCCalibration,
    Rule,
    Sum,
    ds_combine,
    evidence,
    fused_opinion,
    gramian,
    min_norm_weights,
    positive_median,
)
from reference import ds_weights, ds_weights_exact  # noqa: I001  (tests/reference.py)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(n: int, p: int = 7, seed: int = 0) -> Tensor:
    return torch.randn(n, p, generator=gen(seed), dtype=F64)


def positive_var(n: int, p: int = 7, seed: int = 0) -> Tensor:
    """Random positive variances over three decades."""
    return 10 ** (3 * torch.rand(n, p, generator=gen(1000 + seed), dtype=F64) - 2)


def wide_var(n: int, p: int, seed: int, zeros: float = 0.2) -> Tensor:
    """Variances spanning 1e-12..1e4 (log-uniform), a share ``zeros`` of them exactly 0."""
    g = gen(2000 + seed)
    var = 10 ** (16 * torch.rand(n, p, generator=g, dtype=F64) - 12)
    var[torch.rand(n, p, generator=g) < zeros] = 0.0
    return var


def inputs(rule: Rule, n: int, p: int = 7, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """Random rows, and a random positive variance for a rule that needs one."""
    return rows(n, p, seed), positive_var(n, p, seed) if rule.needs_variance else None


def close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- every rule in RULES ---------------------------------------------------------------------
rule_classes = pytest.mark.parametrize("rule_cls", RULES, ids=lambda c: c.__name__)


def test_rules_lists_every_exported_rule() -> None:
    exported = {
        obj
        for name in gradients.__all__
        if isinstance(obj := getattr(gradients, name), type) and issubclass(obj, Rule)
    } - {Rule}
    assert set(RULES) == exported and len(set(RULES)) == len(RULES)
    assert {Sum, MGDA, BOGCCalibration} <= set(RULES)
    for cls in RULES:
        assert isinstance(cls.needs_variance, bool), cls
    assert BOGCCalibration.needs_variance and not Sum.needs_variance and not MGDA.needs_variance


@rule_classes
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("seed", range(3))
def test_rule_gives_a_finite_row_and_weights_that_reproduce_it(
    rule_cls: type[Rule], n: int, seed: int
) -> None:
    rule = rule_cls()
    r, var = inputs(rule, n, seed=seed)
    row, w = rule(r, var)
    assert row.shape == (7,) and row.dtype == r.dtype and torch.isfinite(row).all()
    assert w.shape in ((n,), (n, 7)) and torch.isfinite(w).all()
    close(rule.apply(r, w), row, 1e-12)
    # re-applying cached weights (``every``) is linear in the rows it is given
    r2 = rows(n, seed=seed + 50)
    close(rule.apply(2.5 * r - r2, w), 2.5 * rule.apply(r, w) - rule.apply(r2, w))
    # float32 in, float32 out
    row32, w32 = rule(r.float(), None if var is None else var.float())
    assert row32.dtype == torch.float32 and torch.isfinite(w32).all()
    close(row32.double(), row, 1e-4)


@rule_classes
@pytest.mark.parametrize("n", [1, 2, 3])
def test_rule_coefficients_reproduce_apply_on_any_rows(rule_cls: type[Rule], n: int) -> None:
    # c [n] with apply(rows, w) == c @ rows for EVERY rows (the step reuses it without rows)
    rule = rule_cls()
    r, var = inputs(rule, n, seed=n)
    head, head_var = inputs(rule, 1, seed=8)
    blocks = [Block(r, tuple(range(n)), var), Block(head, (n,), head_var)]
    results = [rule(r, var), *rule.combine(blocks)]
    for row_w in results:
        w = row_w[1]
        c = rule.coefficients(w)
        if c is None:  # only per-dimension weights have no coefficients
            assert w.dim() == 2
            continue
        assert c.shape == (w.shape[0],) and torch.isfinite(c).all()
        for seed in range(3):
            other = rows(w.shape[0], 7, seed=60 + seed)
            close(c.to(other.dtype) @ other, rule.apply(other, w), 1e-12)


@rule_classes
def test_rule_is_pure(rule_cls: type[Rule]) -> None:
    rule = rule_cls()
    r, var = inputs(rule, 3, seed=4)
    row, w = rule(r, var)
    for seed in range(3):  # other calls in between leave no state behind
        rule(*inputs(rule, 3, seed=seed))
        other, other_var = inputs(rule, 2, seed=seed)
        rule.combine([Block(other, (0, 1), other_var)])
    row2, w2 = rule(r, var)
    assert torch.equal(row, row2) and torch.equal(w, w2)
    assert torch.equal(r, rows(3, seed=4))  # the inputs are not modified
    if var is not None:
        assert torch.equal(var, positive_var(3, seed=4))


def blocks_of(rule: Rule, seed: int) -> list[Block]:
    """Encoders reached by the fused objective 0 and a modality's, heads by one objective."""
    spec = [((0, 1), 5), ((2, 0), 4), ((0, 1, 2), 6), ((0,), 3), ((1,), 2), ((2,), 8)]
    out = []
    for i, (objectives, p) in enumerate(spec):
        r, var = inputs(rule, len(objectives), p, seed=10 * seed + i)
        out.append(Block(r, objectives, var))
    return out


@rule_classes
@pytest.mark.parametrize("seed", range(3))
def test_rule_combine_gives_one_row_and_weights_per_block(rule_cls: type[Rule], seed: int) -> None:
    rule = rule_cls()
    blocks = blocks_of(rule, seed)
    out = rule.combine(blocks)
    assert isinstance(out, list) and len(out) == len(blocks)
    for b, (row, w) in zip(blocks, out, strict=True):
        n, p = b.rows.shape
        assert row.shape == (p,) and torch.isfinite(row).all()
        assert w.shape in ((n,), (n, p)) and torch.isfinite(w).all()
        close(rule.apply(b.rows, w), row, 1e-12)


@rule_classes
@pytest.mark.parametrize("seed", range(3))
def test_rule_on_a_single_row_gives_a_positive_multiple_of_it(
    rule_cls: type[Rule], seed: int
) -> None:
    rule = rule_cls()
    r, var = inputs(rule, 1, seed=seed)
    for row, w in [rule(r, var), *rule.combine([Block(r, (0,), var)])]:
        assert row.shape == (7,) and torch.isfinite(row).all() and w.shape in ((1,), (1, 7))
        alpha = float(row @ r[0]) / float(r[0] @ r[0])
        assert alpha > 0
        close(row, alpha * r[0])
        close(rule.apply(r, w), row, 1e-12)


@rule_classes
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("seed", range(2))
def test_rule_permuting_the_objectives_permutes_the_weights(
    rule_cls: type[Rule], n: int, seed: int
) -> None:
    rule = rule_cls()
    r, var = inputs(rule, n, seed=seed)
    row, w = rule(r, var)
    for perm in list(itertools.permutations(range(n)))[1:8]:
        p = list(perm)
        row_p, w_p = rule(r[p], None if var is None else var[p])
        close(row_p, row, 1e-9)
        close(w_p, w[p], 1e-9)


@rule_classes
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rule_on_zero_rows_gives_a_zero_row(rule_cls: type[Rule], n: int) -> None:
    rule = rule_cls()
    zeros = torch.zeros(n, 6, dtype=F64)
    variances = (
        [positive_var(n, 6), torch.zeros(n, 6, dtype=F64)] if rule.needs_variance else [None]
    )
    for var in variances:
        row, w = rule(zeros, var)
        assert torch.isfinite(w).all() and torch.equal(row, torch.zeros(6, dtype=F64))
        ((row_b, w_b),) = rule.combine([Block(zeros, tuple(range(n)), var)])
        assert torch.isfinite(w_b).all() and torch.equal(row_b, torch.zeros(6, dtype=F64))


# ---- Sum -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_sum_is_the_plain_sum_with_unit_weights(n: int) -> None:
    g = rows(n, seed=n)
    row, w = Sum()(g)
    assert torch.equal(row, g.sum(0))
    assert w.dtype == F64 and w.tolist() == [1.0] * n
    blocks = [Block(rows(2, 3, seed=1), (0, 1)), Block(rows(1, 4, seed=2), (1,))]
    for b, (row_b, w_b) in zip(blocks, Sum().combine(blocks), strict=True):
        assert torch.equal(row_b, b.rows.sum(0)) and w_b.tolist() == [1.0] * len(b.objectives)


# ---- MGDA: the min-norm solver -------------------------------------------------------------
def slsqp_min_norm(gram: np.ndarray, seed: int = 0) -> np.ndarray:
    """Independent brute force: SLSQP on the simplex from the centre, every vertex and random
    points; the best point found."""
    n = gram.shape[0]
    starts = [np.full(n, 1 / n), *np.eye(n), *np.random.default_rng(seed).dirichlet(np.ones(n), 2)]
    best = None
    for x0 in starts:
        res = minimize(
            lambda v: v @ gram @ v,
            x0,
            jac=lambda v: 2 * gram @ v,
            bounds=[(0, 1)] * n,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1, "jac": lambda v: np.ones(n)}],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 1000},
        )
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    w = np.clip(best.x, 0, None)
    return w / w.sum()


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_mgda_min_norm_properties(n: int, seed: int) -> None:
    g = rows(n, seed=seed)
    d, w = MGDA()(g)
    # in the convex hull of the rows
    assert (w >= -1e-9).all() and abs(float(w.sum()) - 1) < 1e-9
    close(d, w @ g)
    # a common descent direction: no row has a negative inner product with it
    assert ((g @ d) >= -1e-6 * d.norm() ** 2).all()
    # minimal norm: no random point of the hull is shorter
    for _ in range(200):
        v = torch.rand(n, dtype=F64)
        v /= v.sum()
        assert float((v @ g).norm()) >= float(d.norm()) - 1e-6


def test_mgda_two_objectives_closed_form_and_edge_cases() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    d, w = MGDA()(torch.stack([g1, g2]))
    # min over a: |a g1 + (1-a) g2|^2 = a^2 + 4(1-a)^2 -> a = 0.8
    close(w, torch.tensor([0.8, 0.2]), 1e-6)
    close(d, torch.tensor([0.8, 0.4]), 1e-6)
    d_same, w_same = MGDA()(torch.stack([g1, g1]))
    close(d_same, g1, 1e-6)
    close(w_same, torch.tensor([0.5, 0.5]), 0.0)  # the tie is broken symmetrically
    close(MGDA()(torch.stack([g1, -g1]))[0], torch.zeros(2), 1e-7)
    d2, w2 = MGDA(scale=2.0)(torch.stack([g1, g2]))
    close(d2, 2 * d, 1e-6)
    close(w2, w, 1e-6)  # the scale multiplies the point, not the weights


def random_rows(n: int, g: torch.Generator) -> Tensor:
    """Rows in a random dimension (often < n: singular Gramians), with opposed, collinear,
    duplicated and zero rows planted at random."""
    p = int(torch.randint(1, 9, (1,), generator=g))
    r = torch.randn(n, p, generator=g, dtype=F64)
    for i in range(1, n):
        kind = int(torch.randint(0, 6, (1,), generator=g))
        j = int(torch.randint(0, i, (1,), generator=g))
        c = float(torch.rand(1, generator=g, dtype=F64)) * 2 + 0.1
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
    g = torch.Generator().manual_seed(123)
    for case in range(1000):
        n = 2 + case % 5
        r = random_rows(n, g)
        gram = r @ r.T
        w = min_norm_weights(gram)
        val = float(w @ gram @ w)
        scale = float(gram.diagonal().max())
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-9, case
        # optimality certificate over the simplex (KKT): no vertex direction descends
        assert float((gram @ w).min()) >= val - 1e-7 * scale, case
        if case % 4 == 0:  # and an independent brute force finds nothing lower
            G = gram.numpy()
            v = slsqp_min_norm(G / scale, case)  # on a unit scale: SLSQP's tolerances are absolute
            ref = float(v @ G @ v)
            assert val <= ref * (1 + 1e-6) + 1e-12 * scale, (case, val, ref)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_min_norm_weights_do_not_depend_on_the_gradients_scale(n: int) -> None:
    r = rows(n, 6, seed=n)
    w = min_norm_weights(r @ r.T)
    for c in (1e-8, 1e-6, 1e-4, 1e2, 1e4, 1e6):
        rc = c * r
        torch.testing.assert_close(min_norm_weights(rc @ rc.T), w, rtol=0, atol=1e-6)


def test_min_norm_finds_zero_on_an_opposed_face() -> None:
    h = torch.tensor([0.3, 1.0, -0.2], dtype=F64)
    u = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    r = torch.stack([u, -0.4 * u, h])  # u and -0.4u: the hull contains the origin
    w = min_norm_weights(r @ r.T)
    assert float((w @ r).norm()) < 1e-9
    close(w, torch.tensor([0.4 / 1.4, 1 / 1.4, 0.0], dtype=F64), 1e-9)


def test_frank_wolfe_for_many_objectives_reaches_the_brute_force_minimum() -> None:
    # Frank-Wolfe (more than 8 objectives) converges sublinearly: close to, not at, the minimum
    for seed in range(3):
        r = torch.randn(10, 30, generator=gen(seed), dtype=F64)
        gram = r @ r.T
        fw = min_norm_weights(gram)
        assert (fw >= 0).all() and abs(float(fw.sum()) - 1) < 1e-9
        v = slsqp_min_norm(gram.numpy(), seed)
        uniform, best = float(gram.mean()), float(v @ gram.numpy() @ v)
        # it achieves all but 2% of the possible decrease from its uniform start
        assert uniform - float(fw @ gram @ fw) >= 0.98 * (uniform - best) > 0


def test_frank_wolfe_stops_at_an_optimal_vertex_and_on_identical_rows() -> None:
    r = torch.zeros(10, 2, dtype=F64)
    r[0, 0], r[1:, 0] = 0.01, 1.0  # the best point is vertex 0; the line search overshoots it
    assert min_norm_weights(r @ r.T).tolist() == [1.0] + [0.0] * 9
    same = torch.ones(10, 3, dtype=F64)
    close(min_norm_weights(same @ same.T), torch.full((10,), 0.1, dtype=F64), 1e-12)


def test_frank_wolfe_stops_when_the_line_search_step_is_zero() -> None:
    r = torch.ones(10, 2, dtype=F64)
    r[9, 1] = 0.0  # [1, 0] is the min-norm point; every row has the same product with it
    w = min_norm_weights(r @ r.T)
    torch.testing.assert_close(w, torch.eye(10, dtype=F64)[9], atol=1e-12, rtol=0)


def test_eight_objectives_are_solved_exactly() -> None:
    r = torch.randn(8, 3, generator=gen(8), dtype=F64)
    r[5] = -0.3 * r[2]  # a degenerate face: Frank-Wolfe would stop short of 0
    w = min_norm_weights(r @ r.T)
    assert float((w @ r).norm()) < 1e-9


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_min_norm_weights_keep_the_gramians_dtype(n: int) -> None:
    r = torch.randn(n, 4, generator=gen(n))
    w = min_norm_weights(r @ r.T)
    assert w.dtype == torch.float32 and w.shape == (n,)
    assert abs(float(w.sum()) - 1) < 1e-5


@pytest.mark.parametrize("n", [1, 2, 3])
def test_min_norm_weights_keep_float64(n: int) -> None:
    same = torch.ones(n, 4, dtype=F64)  # identical rows: the two-objective tie too
    w = min_norm_weights(same @ same.T)
    assert w.dtype == F64 and abs(float(w.sum()) - 1) < 1e-12


# ---- MGDA: normalize -----------------------------------------------------------------------
def test_mgda_normalize_solves_on_unit_rows_and_weights_the_original_ones() -> None:
    g1 = torch.tensor([3.0, 0.0], dtype=F64)  # |g1| = 3
    g2 = torch.tensor([0.0, 0.5], dtype=F64)  # |g2| = 0.5
    d, w = MGDA(normalize=True)(torch.stack([g1, g2]))
    # unit rows e1 and e2 are orthogonal and of equal length: min-norm weights (1/2, 1/2)
    close(w, torch.tensor([0.5, 0.5], dtype=F64))
    close(d, 0.5 * g1 + 0.5 * g2)
    # without normalisation the short row dominates: w1 = |g2|^2 / |g1 - g2|^2
    _, w_plain = MGDA()(torch.stack([g1, g2]))
    assert float(w_plain[0]) == pytest.approx(0.25 / 9.25)
    # a zero row stays finite: its unit row is 0, so it takes all the weight
    d0, w0 = MGDA(normalize=True)(torch.stack([g1, torch.zeros(2, dtype=F64)]))
    assert torch.isfinite(d0).all() and w0.tolist() == [0.0, 1.0] and d0.abs().max() == 0


def test_mgda_normalize_scales_rows_not_columns() -> None:
    g = torch.tensor([[3.0, 0.0, 4.0], [0.0, 1.0, 0.0]], dtype=F64)  # norms 5 and 1
    d, w = MGDA(normalize=True)(g)
    # unit rows [0.6, 0, 0.8] and [0, 1, 0] are orthogonal: weights (1/2, 1/2)
    close(w, torch.tensor([0.5, 0.5], dtype=F64))
    close(d, 0.5 * g[0] + 0.5 * g[1])


# ---- MGDA: scopes --------------------------------------------------------------------------
def modality_blocks(n_mod: int, seed: int) -> list[Block]:
    """Objective 0 = fused, objective m = modality m: encoder m reached by (0, m) (listed in
    alternating order), the fused head by 0, head m by m. Heads' gradients are large, so a
    solver that let them into the Gramian would get other weights."""
    g = gen(seed)
    blocks = []
    for m in range(1, n_mod + 1):
        objectives = (0, m) if m % 2 else (m, 0)
        blocks.append(Block(torch.randn(2, 3 + m, generator=g, dtype=F64), objectives))
    blocks.append(Block(5 * torch.randn(1, 4, generator=g, dtype=F64), (0,)))
    for m in range(1, n_mod + 1):
        blocks.append(Block(5 * torch.randn(1, 2 + m, generator=g, dtype=F64), (m,)))
    return blocks


def full_gradients(blocks: list[Block]) -> tuple[np.ndarray, list[int]]:
    """Each objective's gradient over the shared blocks, concatenated (zeros where it does not
    reach): ``[n_objectives, sum P]``, and the objective ids (sorted)."""
    shared = [b for b in blocks if len(b.objectives) > 1]
    ids = sorted({k for b in blocks for k in b.objectives})
    full = np.zeros((len(ids), sum(b.rows.shape[1] for b in shared)))
    start = 0
    for b in shared:
        p = b.rows.shape[1]
        for row, k in zip(b.rows.numpy(), b.objectives, strict=True):
            full[ids.index(k), start : start + p] = row
        start += p
    return full, ids


def test_gramian_is_the_gram_of_the_full_gradients_over_the_blocks() -> None:
    blocks = [b for b in modality_blocks(3, seed=5) if len(b.objectives) > 1]
    full, ids = full_gradients(blocks)
    gram, gram_ids = gramian(blocks)
    assert gram_ids == ids == [0, 1, 2, 3] and gram.dtype == F64
    np.testing.assert_allclose(gram.numpy(), full @ full.T, rtol=1e-12, atol=1e-12)
    # not the sum of the blocks' own Gramians placed at 0..n_b-1
    assert float(gram[1, 2]) == 0.0 and float(gram[1, 1]) > 0


@pytest.mark.parametrize(
    "kwargs", [{}, {"scale": 3.0}, {"normalize": True}, {"scale": 2.0, "normalize": True}]
)
@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_mgda_global_scope_is_one_min_norm_over_the_encoders(
    kwargs: dict, n_mod: int, seed: int
) -> None:
    blocks = modality_blocks(n_mod, seed)
    full, ids = full_gradients(blocks)
    scale = kwargs.get("scale", 1.0)
    solve_on = full
    if kwargs.get("normalize"):
        solve_on = full / np.linalg.norm(full, axis=1, keepdims=True)
    v = slsqp_min_norm(solve_on @ solve_on.T, seed)
    out = MGDA(**kwargs).combine(blocks)  # {} -> scope="global" by default
    assert len(out) == len(blocks)
    for b, (row, w) in zip(blocks, out, strict=True):
        if len(b.objectives) > 1:
            expected_w = torch.tensor([v[ids.index(k)] for k in b.objectives], dtype=F64)
            close(w, expected_w, 1e-6)
            close(row, scale * expected_w @ b.rows, 1e-6)
        else:
            close(row, scale * b.rows[0], 1e-12)
            close(w, torch.ones(1, dtype=F64), 0.0)
    if not kwargs.get("normalize"):
        # mmlearn's encoder rows, put together, descend on every objective's full gradient
        shared = [
            row.numpy() for b, (row, _) in zip(blocks, out, strict=True) if len(b.objectives) > 1
        ]
        d = np.concatenate(shared)
        assert (full @ d >= -1e-9 * float(d @ d)).all()


@pytest.mark.parametrize("seed", range(3))
def test_mgda_per_group_scope_is_a_min_norm_per_block(seed: int) -> None:
    blocks = [*modality_blocks(2, seed), Block(rows(3, 5, seed=seed), (0, 1, 2))]
    out = MGDA(scale=2.0, scope="per_group").combine(blocks)
    for i, (b, (row, w)) in enumerate(zip(blocks, out, strict=True)):
        R = b.rows.numpy()
        v = torch.tensor(slsqp_min_norm(R @ R.T, seed + i), dtype=F64)
        close(w, v, 1e-6)
        close(row, 2.0 * v @ b.rows, 1e-6)


def test_mgda_scopes_are_distinct_methods_on_three_modalities() -> None:
    blocks = modality_blocks(3, seed=7)
    glob = MGDA(scope="global").combine(blocks)
    per = MGDA(scope="per_group").combine(blocks)
    for b, (row_g, _), (row_p, _) in zip(blocks, glob, per, strict=True):
        if len(b.objectives) > 1:  # every encoder gets another direction
            assert not torch.allclose(row_g, row_p, rtol=1e-2, atol=1e-2), b.objectives
        else:  # heads agree: scale * row in both
            close(row_g, row_p, 1e-12)


def test_mgda_global_normalize_uses_the_full_gradients_norms_by_hand() -> None:
    # two objectives, two shared blocks; full gradients (3, 0 | 0, 0) and (0, 0 | 0, 0.5):
    # orthogonal, norms 3 and 0.5
    enc1 = Block(torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=F64), (0, 1))
    enc2 = Block(torch.tensor([[0.0, 0.0], [0.0, 0.5]], dtype=F64), (0, 1))
    (r1, w1), (r2, w2) = MGDA(normalize=True).combine([enc1, enc2])
    close(w1, torch.tensor([0.5, 0.5], dtype=F64))
    close(w2, torch.tensor([0.5, 0.5], dtype=F64))
    close(r1, torch.tensor([1.5, 0.0], dtype=F64))
    close(r2, torch.tensor([0.0, 0.25], dtype=F64))
    # unnormalised: w_0 = |g_1|^2 / |g_0 - g_1|^2 = 0.25 / 9.25, in both blocks
    (r1, w1), (r2, w2) = MGDA().combine([enc1, enc2])
    close(w1, torch.tensor([0.25 / 9.25, 9 / 9.25], dtype=F64))
    close(r2, torch.tensor([0.0, 0.5 * 9 / 9.25], dtype=F64))
    # per group, enc1's second row is 0: its unit row is 0, it takes all the weight
    (r1, w1), _ = MGDA(normalize=True, scope="per_group").combine([enc1, enc2])
    assert w1.tolist() == [0.0, 1.0] and r1.abs().max() == 0


def test_mgda_global_scope_without_shared_blocks_gives_scale_times_each_row() -> None:
    blocks = [Block(rows(1, 3, seed=1), (0,)), Block(rows(1, 4, seed=2), (1,))]
    for b, (row, w) in zip(blocks, MGDA(scale=1.5).combine(blocks), strict=True):
        close(row, 1.5 * b.rows[0], 1e-12)
        assert w.tolist() == [1.0]


@pytest.mark.parametrize("scope", ["global", "per_group"])
def test_mgda_coefficients_carry_the_scale(scope: str) -> None:
    rule = MGDA(scale=2.5, scope=scope)
    blocks = modality_blocks(2, seed=3)
    for b, (row, w) in zip(blocks, rule.combine(blocks), strict=True):
        c = rule.coefficients(w)
        assert c is not None
        close(c @ b.rows, row, 1e-12)
        close(c, 2.5 * w, 1e-15)
        if len(b.objectives) == 1:  # a head: its row times the scale
            assert c.tolist() == [2.5]


def test_mgda_rejects_a_bad_scope_or_scale() -> None:
    for scope in ("local", "Global", "per-group", ""):
        with pytest.raises(MMLearnError, match=r"MGDA: scope=.*expected one of"):
            MGDA(scope=scope)
    for scale in (0.0, -1.0, float("nan")):
        with pytest.raises(MMLearnError, match=r"MGDA: scale=.*expected > 0"):
            MGDA(scale=scale)
    assert MGDA(scope="per_group").scope == "per_group"


# ---- BOGC: the reference -------------------------------------------------------------------
def test_reference_ds_weights_by_hand() -> None:
    # positives 1, 2, 3, 4: the lower median m = 2 (not 2.5); eps_rel 0.5: e = 3 / (var + 1)
    var = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    e = torch.tensor([[1.5, 1.0], [0.75, 0.6]], dtype=F64)
    # two simple-support opinions fused: w_k = (e_k + 1/2) / (e_1 + e_2 + 1)
    expected = (e + 0.5) / (e.sum(0) + 1)
    close(ds_weights(var, eps_rel=0.5, e_max=10.0), expected, 1e-12)
    # the cap e_max = 0.9 binds on e_00 = 1.5 and e_01 = 1
    capped = e.clamp(max=0.9)
    close(ds_weights(var, 0.5, 0.9), (capped + 0.5) / (capped.sum(0) + 1), 1e-12)
    torch.testing.assert_close(
        BOGCCalibration(eps_rel=0.5, e_max=10.0)(torch.ones(2, 2, dtype=F64), var)[1], expected
    )


# ---- BOGC against the reference ------------------------------------------------------------
# evidence up to 1e3: where the float64 pairwise reference holds ~1e-10 (beyond: the exact test)
SETTINGS = [(1e-3, 1e3), (0.5, 1.2), (1e-5, 300.0), (0.1, 5.0)]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("seed", range(8))
def test_bogc_weights_equal_the_reference(n: int, seed: int) -> None:
    eps_rel, e_max = SETTINGS[seed % len(SETTINGS)]
    p = 6 + seed  # odd and even entry counts: the lower median matters
    mu = rows(n, p, seed)
    var = wide_var(n, p, seed, zeros=0.0 if seed < 2 else 0.25)
    rule = BOGCCalibration() if (eps_rel, e_max) == (1e-3, 1e3) else BOGCCalibration(eps_rel, e_max)
    row, w = rule(mu, var)
    expected = ds_weights(var, eps_rel, e_max)
    close(w, expected, 1e-9)
    close(row, n * (expected * mu).sum(0), 1e-9)
    close(w.sum(0), torch.ones(p, dtype=F64), 1e-12)
    assert (w > 0).all()


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("seed", range(3))
def test_bogc_weights_equal_the_exact_pairwise_fusion_for_large_evidence(n: int, seed: int) -> None:
    # eps_rel 1e-7 and no cap to speak of: evidence up to 1e7, where 1 - C cancels in float64
    mu, var = rows(n, 9, seed), wide_var(n, 9, seed)
    row, w = BOGCCalibration(eps_rel=1e-7, e_max=1e9)(mu, var)
    expected = ds_weights_exact(var, 1e-7, 1e9)
    close(w, expected, 1e-12)
    close(row, n * (expected * mu).sum(0), 1e-12)
    assert float(evidence(var, 1e-7, 1e9).max()) > 1e6


def test_bogc_cap_binds_on_wide_variances() -> None:
    # variances spanning 1e-12..1e4 with zeros: the default cap 1e3 changes the weights, which
    # are far from uniform
    mu, var = rows(3, 9, 3), wide_var(3, 9, 3, zeros=0.25)
    _, w = BOGCCalibration()(mu, var)
    _, w_uncapped = BOGCCalibration(e_max=1e9)(mu, var)
    assert float(w.max()) > 0.9 and float(w.min()) < 0.01
    assert not torch.allclose(w, w_uncapped, rtol=0, atol=1e-4)
    close(w_uncapped, ds_weights_exact(var, e_max=1e9), 1e-12)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("c", [1e-4, 1e-2, 1e2, 1e4])
def test_bogc_is_scale_invariant(n: int, c: float) -> None:
    mu = rows(n, 40, seed=n)
    var = wide_var(n, 40, seed=n)
    row, w = BOGCCalibration()(mu, var)
    row_c, w_c = BOGCCalibration()(c * mu, c**2 * var)
    assert float((w_c - w).abs().max()) <= 1e-5
    close(row_c / c, row, 1e-5)
    assert not torch.allclose(w, torch.full_like(w, 1 / n), atol=1e-2)  # weights that can move


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_bogc_appending_dead_coordinates_changes_nothing_else(n: int, seed: int) -> None:
    p, dead = 200, 10  # 5% dead coordinates: variance 0, gradient 0
    mu = rows(n, p, seed)
    var = positive_var(n, p, seed)
    row, w = BOGCCalibration()(mu, var)
    mu2 = torch.cat([mu, torch.zeros(n, dead, dtype=F64)], 1)
    var2 = torch.cat([var, torch.zeros(n, dead, dtype=F64)], 1)
    row2, w2 = BOGCCalibration()(mu2, var2)
    assert float((w2[:, :p] - w).abs().max()) <= 1e-6
    close(row2[:p], row, 1e-6)
    assert torch.isfinite(w2).all() and torch.equal(row2[p:], torch.zeros(dead, dtype=F64))
    close(w2, ds_weights(var2), 1e-10)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_bogc_equal_variances_reproduce_the_plain_sum(n: int) -> None:
    mu = rows(n, 50, seed=n)
    per_dim = positive_var(1, 50, seed=n).expand(n, 50)  # equal over objectives, not dimensions
    for var in (
        torch.full_like(mu, 1e-12),
        torch.full_like(mu, 0.3),
        torch.full_like(mu, 1e6),
        per_dim.clone(),
    ):
        row, w = BOGCCalibration()(mu, var)
        torch.testing.assert_close(w, torch.full_like(mu, 1 / n), rtol=0, atol=1e-15)
        torch.testing.assert_close(row, mu.sum(0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_bogc_all_zero_variance_gives_the_plain_sum(n: int) -> None:
    mu = rows(n, 9, seed=n)
    row, w = BOGCCalibration()(mu, torch.zeros_like(mu))
    torch.testing.assert_close(w, torch.full_like(mu, 1 / n), rtol=0, atol=1e-15)
    torch.testing.assert_close(row, mu.sum(0), rtol=0, atol=1e-14)
    close(ds_weights(torch.zeros_like(mu)), w, 1e-15)


def test_bogc_lower_variance_gets_more_weight_per_dimension() -> None:
    g = rows(2, p=4)
    var = torch.tensor([[0.1, 1.0, 1.0, 5.0], [1.0, 0.1, 1.0, 0.5]], dtype=F64)
    _, w = BOGCCalibration()(g, var)
    assert w[0, 0] > w[1, 0] and w[1, 1] > w[0, 1] and w[1, 3] > w[0, 3]
    close(w[:, 2], torch.full((2,), 0.5, dtype=F64))
    # by hand: positives 0.1 0.1 0.5 1 1 1 1 5, lower median m = 1; e = 1.001 / (var + 0.001);
    # dimension 0: e = (1.001 / 0.101, 1), w_k = (e_k + 1/2) / (e_1 + e_2 + 1)
    e0 = 1.001 / 0.101
    expected = torch.tensor([(e0 + 0.5) / (e0 + 2), 1.5 / (e0 + 2)], dtype=F64)
    close(w[:, 0], expected, 1e-12)  # ~ [0.8741, 0.1259]


def test_bogc_is_finite_for_zero_variance_and_zero_gradients() -> None:
    zeros = torch.zeros(2, 5)
    out, w = BOGCCalibration()(zeros, zeros)
    assert torch.isfinite(out).all() and torch.isfinite(w).all() and out.abs().max() == 0
    g = rows(2, p=5).float()
    var = torch.tensor([[0.0] * 5, [1.0] * 5])
    out, w = BOGCCalibration()(g, var)
    assert torch.isfinite(out).all() and (w[0] > w[1]).all()
    out, w = BOGCCalibration()(zeros, var)
    assert torch.isfinite(w).all() and out.abs().max() == 0


def test_bogc_without_variance_names_the_estimators() -> None:
    g = rows(2)
    for call in (
        lambda: BOGCCalibration()(g, None),
        lambda: BOGCCalibration()(g),
        lambda: BOGCCalibration().combine([Block(g, (0, 1))]),
    ):
        with pytest.raises(MMLearnError) as info:
            call()
        msg = str(info.value)
        assert all(name in msg for name in ("EMAMoments", "Microbatch", "LastLayer")), msg
    # a group reached by one objective needs none: its row passes through unchanged
    row, w = BOGCCalibration()(g[:1], None)
    assert torch.equal(row, g[0]) and w.tolist() == [1.0]
    assert torch.equal(BOGCCalibration().apply(g[:1], w), g[0])


def test_bogc_rejects_non_positive_eps_rel_and_e_max() -> None:
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(MMLearnError, match=r"BOGC: eps_rel=.*expected > 0"):
            BOGCCalibration(eps_rel=bad)
        with pytest.raises(MMLearnError, match=r"BOGC: e_max=.*expected > 0"):
            BOGCCalibration(e_max=bad)
    BOGCCalibration(eps_rel=1e-9, e_max=1e-3)  # small but positive: allowed


def test_bogc_large_group_subsamples_its_median_and_stays_scale_invariant() -> None:
    n, p = 2, 2**17 + 3001  # 268146 entries > 2**18: every 2nd flat entry
    g = gen(17)
    var = 10 ** (16 * torch.rand(n, p, generator=g, dtype=F64) - 12)
    var.view(-1)[1::2] *= 1e3  # the skipped entries are larger: the full median is another
    var[torch.rand(n, p, generator=g) < 0.05] = 0.0
    mu = torch.randn(n, p, generator=g, dtype=F64)
    row, w = BOGCCalibration()(mu, var)
    close(w, ds_weights(var, subsample=2**18), 1e-10)
    assert not torch.allclose(w, ds_weights(var), atol=1e-3)  # the subsample is a choice
    for c in (1e-4, 1e4):
        row_c, w_c = BOGCCalibration()(c * mu, c**2 * var)
        assert float((w_c - w).abs().max()) <= 1e-5, c
        close(row_c / c, row, 1e-5)


# ---- BOGC: its parts -----------------------------------------------------------------------
def test_positive_median_by_hand() -> None:
    assert float(positive_median(torch.tensor([3.0, 0.0, -1.0, 1.0, 2.0, 5.0]))) == 2.0
    assert float(positive_median(torch.tensor([[1.0, 9.0], [5.0, 0.0]]))) == 5.0
    assert float(positive_median(torch.tensor([4.0]))) == 4.0
    assert math.isnan(float(positive_median(torch.tensor([0.0, -2.0, 0.0]))))
    # above 2**18 entries: every ceil(numel / 2**18)-th entry; here every 2nd, all 7
    x = torch.ones(2**18 + 2, dtype=F64)
    x[::2] = 7.0
    assert float(positive_median(x)) == 7.0  # the full lower median would be 1


def test_evidence_is_scale_free_capped_and_one_at_the_median() -> None:
    var = torch.ones(1, 3001, dtype=F64)
    var[0, 0] = 0.0  # a dead coordinate: e = (1 + eps_rel) / eps_rel = 1001 before the cap
    var[0, 1] = 4.0
    e = evidence(var)
    assert float(e[0, 0]) == 1000.0  # e_max: 1e3 by default
    assert float(e[0, 2]) == pytest.approx(1.0, rel=1e-12)  # the median entry
    assert float(e[0, 1]) == pytest.approx(1.001 / 4.001, rel=1e-12)
    assert float(evidence(var, e_max=5e3)[0, 0]) == pytest.approx(1001.0, rel=1e-12)
    assert float(evidence(var, eps_rel=0.5)[0, 0]) == pytest.approx(3.0, rel=1e-12)
    close(evidence(1e6 * var), e, 1e-12)
    assert torch.equal(evidence(torch.zeros(2, 3)), torch.ones(2, 3))
    # the rule passes the cap on: e_max = 10 on the dead coordinate, e = 1 for the other row
    mu = torch.ones(2, 3001, dtype=F64)
    var2 = torch.cat([var, torch.ones_like(var)])
    _, w = BOGCCalibration(e_max=10.0)(mu, var2)
    assert float(w[0, 0]) == pytest.approx(10.5 / 12, rel=1e-12)
    _, w_default = BOGCCalibration()(mu, var2)
    assert float(w_default[0, 0]) == pytest.approx(1000.5 / 1002, rel=1e-12)


def test_bogc_closed_form_equals_pairwise_ds_fusion() -> None:
    n, p = 4, 6
    e = 5 * torch.rand(n, p, generator=gen(1), dtype=F64)
    e[0, 0] = 0.0
    b_closed, u_closed = fused_opinion(e)
    # simple-support opinion of objective k: belief e_k/(e_k+1) on singleton k, the rest uncertain
    beliefs = [torch.zeros(n, p, dtype=F64) for _ in range(n)]
    for k in range(n):
        beliefs[k][k] = e[k] / (e[k] + 1)
    b, u = beliefs[0], 1 / (e[0] + 1)
    for k in range(1, n):
        b, u = ds_combine(b, u, beliefs[k], 1 / (e[k] + 1))
    close(b, b_closed, 1e-12)
    close(u, u_closed, 1e-12)
    close(b.sum(0) + u, torch.ones(p, dtype=F64), 1e-12)
    close(b_closed, e / (e.sum(0) + 1), 1e-12)


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


def test_ds_rule_keeps_dimensions_apart() -> None:
    b1 = torch.tensor([[0.5, 0.1], [0.2, 0.6]])
    b2 = torch.tensor([[0.4, 0.3], [0.4, 0.3]])
    u1, u2 = 1 - b1.sum(0), 1 - b2.sum(0)
    b, u = ds_combine(b1, u1, b2, u2)
    for j in range(2):  # each dimension fused on its own
        bj, uj = ds_combine(b1[:, j : j + 1], u1[j : j + 1], b2[:, j : j + 1], u2[j : j + 1])
        torch.testing.assert_close(b[:, j], bj[:, 0])
        torch.testing.assert_close(u[j], uj[0])


def test_bogc_combine_takes_each_blocks_median_on_its_own() -> None:
    # two groups whose variances differ by 1e6: one median over both would change the weights
    v1, v2 = wide_var(2, 8, 1, zeros=0.0), 1e6 * wide_var(3, 5, 2, zeros=0.0)
    blocks = [
        Block(rows(2, 8, 1), (0, 1), v1),
        Block(rows(3, 5, 2), (0, 1, 2), v2),
        Block(rows(1, 4, 3), (2,), None),
    ]
    out = BOGCCalibration(eps_rel=0.1, e_max=50.0).combine(blocks)
    close(out[0][1], ds_weights(v1, 0.1, 50.0))
    close(out[1][1], ds_weights(v2, 0.1, 50.0))
    close(out[0][0], 2 * (ds_weights(v1, 0.1, 50.0) * blocks[0].rows).sum(0))
    assert torch.equal(out[2][0], blocks[2].rows[0])


def test_bogc_on_one_dimension_calibrates() -> None:
    g = rows(2, p=1)  # two objectives, ONE dimension
    var = torch.tensor([[0.1], [1.0]], dtype=F64)
    out, w = BOGCCalibration()(g, var)
    # positives 0.1, 1: lower median 0.1; e = 0.1001 / (var + 1e-4) = (1, 0.1001 / 1.0001)
    e = torch.tensor([[1.0], [0.1001 / 1.0001]], dtype=F64)
    close(w, (e + 0.5) / (e.sum(0) + 1), 1e-12)
    close(out, 2 * (w * g).sum(0), 1e-12)
    assert not torch.allclose(out, g.sum(0))  # calibrated, not summed
