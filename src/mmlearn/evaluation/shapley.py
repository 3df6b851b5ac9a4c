"""Each modality's share of a metric: the exact Shapley value of the modality game.

The game: ``v(S)`` is the metric of the model given only the modalities in ``S`` (evaluated
with the others absent), ``v({})`` the metric of the training class prior. The Shapley value
(Shapley, 1953) of modality ``m`` among ``M`` is its marginal contribution averaged over every
order in which the modalities could be added:

``phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! * (v(S + {m}) - v(S))``

It is the only split of ``v(all) - v({})`` that is efficient (the values sum to it), symmetric
(interchangeable modalities get equal values), gives 0 to a modality that never changes ``v``
(dummy) and is additive over games. Exact evaluation needs all ``2^M - 1`` non-empty subsets
(63 for M = 6; cost ``O(M 2^M)``, so the evaluations of ``v`` dominate, not this sum).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from itertools import combinations

from mmlearn.errors import MMLearnError


def _unique(modalities: Sequence[str], where: str) -> list[str]:
    names = list(modalities)
    duplicates = sorted({m for m in names if names.count(m) > 1})
    if duplicates:
        raise MMLearnError(f"{where}: modalities {duplicates} are listed more than once: {names}")
    return names


def subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities``, by size, then in the modalities' order.

    For ``a, b, c``: ``(a,), (b,), (c,), (a, b), (a, c), (b, c), (a, b, c)``: ``2^M - 1``
    tuples, the evaluations :func:`shapley_values` needs.

    Raises:
        MMLearnError: a modality listed twice.
    """
    names = _unique(modalities, "subsets")
    return [s for size in range(1, len(names) + 1) for s in combinations(names, size)]


def shapley_values(
    values: Mapping[frozenset[str], float], modalities: Sequence[str], empty: float
) -> dict[str, float]:
    """The exact Shapley value of each modality (the formula of the module docstring).

    Args:
        values: ``v(S)`` for every non-empty subset ``S`` of ``modalities``; a subset naming
            another modality is an error.
        modalities: the ``M`` players, in the order of the result.
        empty: ``v({})``, the metric of the training class prior.

    Returns:
        modality -> ``phi_m``; the values sum to ``v(all) - empty`` up to float rounding (the
        weights ``|S|! (M-|S|-1)! / M!`` are exact fractions).

    Raises:
        MMLearnError: no modalities, a modality listed twice, a subset missing from ``values``,
            a subset naming an unknown modality, or a value that is not finite.
    """
    names = _unique(modalities, "shapley_values")
    if not names:
        raise MMLearnError("shapley_values: no modalities given, expected at least one")
    known = set(names)
    unknown = sorted({m for s in values for m in s} - known)
    if unknown:
        raise MMLearnError(
            f"shapley_values: values name modalities {unknown} not among the modalities {names}"
        )
    needed = [frozenset(s) for s in subsets(names)]
    missing = [sorted(s) for s in needed if s not in values]
    if missing:
        raise MMLearnError(
            f"shapley_values: v(S) missing for the subsets {missing} of {names}: the exact "
            f"Shapley values need all {len(needed)} non-empty subsets"
        )
    v: dict[frozenset[str], float] = {frozenset(): float(empty)}
    v |= {s: float(values[s]) for s in needed}
    bad = {tuple(sorted(s)): x for s, x in v.items() if not math.isfinite(x)}
    if bad:
        raise MMLearnError(f"shapley_values: v(S) not finite for {bad} (() is `empty`)")
    # exact rational arithmetic throughout (floats are exact fractions): the values then sum to
    # v(all) - v({}) exactly, and only the final conversion of each value to float rounds
    exact = {s: Fraction(x) for s, x in v.items()}
    n = len(names)
    fact = math.factorial
    weight = [Fraction(fact(k) * fact(n - k - 1), fact(n)) for k in range(n)]
    out: dict[str, float] = {}
    for m in names:
        others = [o for o in names if o != m]
        marginal = (
            weight[k] * (exact[frozenset(s) | {m}] - exact[frozenset(s)])
            for k in range(n)
            for s in combinations(others, k)
        )
        out[m] = float(sum(marginal, Fraction(0)))
    return out
