"""The split of every strategy at its features, which ``mmlearn evaluate`` is built on.

``decode(encode(x))`` must be ``forward(x)`` for every registered strategy (and variant), and a
subset formed from cached features must be the strategy's own prediction on inputs where the
absent modalities are replaced: the one-pass evaluation is only valid if both hold.
"""

from __future__ import annotations

import pytest
import torch

from helpers import STRATEGY_OPTIONS, instantiate
from mmlearn.evaluation.features import FeatureCache, fill_features, subset_log_probs
from mmlearn.strategies import STRATEGIES

SHAPES = {"a": [5], "b": [3, 6, 6], "c": [4]}
FUSIONS = ("concat", "lrtf")


def build(key: str, fusion: str = "concat") -> torch.nn.Module:
    cls, options = STRATEGY_OPTIONS[key]
    supported = STRATEGIES[cls].supported_fusions
    if supported is not None and fusion not in supported:
        fusion = supported[0]  # OGM-GE reads a concat head's blocks
    torch.manual_seed(0)
    model = STRATEGIES[cls](
        input_shapes=SHAPES, num_classes=4, fusion=fusion, embed_dim=8, **instantiate(options)
    )
    return model.eval()


def inputs(n: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, *shape, generator=g) for m, shape in SHAPES.items()}


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("key", list(STRATEGY_OPTIONS))
def test_decode_of_encode_is_forward(key: str, fusion: str) -> None:
    model = build(key, fusion)
    x = inputs()
    with torch.no_grad():
        want = model(x)
        got = model.decode(model.encode(x))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    # every encoder is listed once, each under its own modality
    encoders = model.feature_encoders()
    assert len({id(e) for _, e in encoders.values()}) == len(encoders)
    assert {m for m, _ in encoders.values()} == set(SHAPES)


@pytest.mark.parametrize("key", list(STRATEGY_OPTIONS))
def test_an_imputed_subset_from_features_is_the_forward_pass_on_imputed_inputs(key: str) -> None:
    model = build(key, "lrtf")
    x = inputs(n=7)
    fill = {m: torch.full(shape, 0.7) for m, shape in SHAPES.items()}
    with torch.no_grad():
        cache = FeatureCache(model.encode(x), torch.zeros(7, dtype=torch.long))
        fills = {"impute_mean": fill_features(model, fill, torch.device("cpu"))}
        got = subset_log_probs(model, cache, ["b"], "impute_mean", fills, torch.device("cpu"))
        imputed = {m: (v if m == "b" else fill[m].expand_as(v)) for m, v in x.items()}
        want = model.predict_log_proba(model(imputed), None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["IntraOnly", "I2M2"])
def test_drop_is_the_rule_with_the_absent_experts_left_out(key: str) -> None:
    model = build(key)
    x = inputs(n=5)
    zeros = {m: torch.zeros(shape) for m, shape in SHAPES.items()}
    with torch.no_grad():
        cache = FeatureCache(model.encode(x), torch.zeros(5, dtype=torch.long))
        f = fill_features(model, zeros, torch.device("cpu"))
        fills = {"impute_mean": f, "impute_zero": f}
        got = subset_log_probs(model, cache, ["a", "c"], "drop", fills, torch.device("cpu"))
        present = {m: torch.full((5,), m != "b") for m in SHAPES}
        imputed = {m: (v if m != "b" else torch.zeros_like(v)) for m, v in x.items()}
        want = model.predict_log_proba(model(imputed), present)
        # and by hand for IntraOnly (joint mode: lsm of the present experts' summed logits)
        if key == "IntraOnly":
            out = model(x)
            torch.testing.assert_close(
                got, torch.log_softmax(out["a"] + out["c"], -1), rtol=1e-5, atol=1e-5
            )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
