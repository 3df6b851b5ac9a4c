"""Fusions: output sizes, errors, and low-rank fusion against its defining formula."""

from __future__ import annotations

import re

import pytest
import torch

from mmlearn.errors import MMLearnError
from mmlearn.fusion import build_fusion


def feats(b: int = 3, dims: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    dims = dims or {"a": 4, "b": 5}
    return {m: torch.randn(b, d) for m, d in dims.items()}


def test_concat_and_sum() -> None:
    f = feats(dims={"a": 4, "b": 4})
    cat = build_fusion("concat", {"a": 4, "b": 4})
    assert cat.out_dim == 8 and torch.equal(cat(f), torch.cat([f["a"], f["b"]], 1))
    s = build_fusion("sum", {"a": 4, "b": 4})
    assert s.out_dim == 4 and torch.allclose(s(f), f["a"] + f["b"])
    with pytest.raises(MMLearnError, match="equal feature sizes"):
        build_fusion("sum", {"a": 4, "b": 5})
    with pytest.raises(MMLearnError, match=r"unknown fusion 'film'.*\['concat', 'lrtf', 'sum'\]"):
        build_fusion("film", {"a": 4})


def test_lrtf_equals_its_formula() -> None:
    torch.manual_seed(0)
    dims = {"a": 3, "b": 2, "c": 4}
    fus = build_fusion("lrtf", dims, out_dim=5, rank=3)
    with torch.no_grad():
        fus.bias.normal_()
        fus.rank_weights.normal_()
    f = feats(2, dims)
    expected = torch.zeros(2, 5)
    for i in range(2):
        for r in range(3):
            prod = torch.ones(5)
            for m in dims:
                z1 = torch.cat([f[m][i], torch.ones(1)])
                prod = prod * (z1 @ fus.factors[m][r])
            expected[i] += fus.rank_weights[r] * prod
        expected[i] += fus.bias
    assert torch.allclose(fus(f), expected, atol=1e-5)
    # multiplicative: the output is not additive in the modalities (it can express interactions)
    f0 = {m: torch.zeros_like(x) for m, x in f.items()}
    only_a = {**f0, "a": f["a"]}
    only_b = {**f0, "b": f["b"]}
    both = {**f0, "a": f["a"], "b": f["b"]}
    additive = fus(only_a) + fus(only_b) - fus(f0)
    assert not torch.allclose(fus(both), additive, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "dims", "kwargs", "message"),
    [
        ("lrtf", {"a": 4}, {"rank": 0}, "LowRankTensorFusion: rank=0; expected an integer >= 1"),
        (
            "lrtf",
            {"a": 4},
            {"out_dim": 0},
            "LowRankTensorFusion: out_dim=0; expected an integer >= 1 (or null)",
        ),
        (
            "concat",
            {"a": 4, "b": 0},
            {},
            "ConcatFusion: feature sizes {'b': 0}; expected integers >= 1",
        ),
        ("sum", {}, {}, "SumFusion: no modalities to fuse; expected at least one feature size"),
    ],
)
def test_fusions_refuse_bad_sizes(
    name: str, dims: dict[str, int], kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(MMLearnError, match="^" + re.escape(message) + "$"):
        build_fusion(name, dims, **kwargs)
    # the smallest good sizes build
    assert build_fusion("lrtf", {"a": 1}, out_dim=1, rank=1).out_dim == 1
