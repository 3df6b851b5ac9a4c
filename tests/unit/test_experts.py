"""Product-of-experts identities of IntraOnly and I2M2 on hand-made logits (docs/methods.md 2-3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmlearn.heads import product_of_experts
from mmlearn.strategies import FUSED, I2M2, InterOnly, IntraOnly

SHAPES = {"a": [4], "b": [3], "c": [5]}


@pytest.fixture
def logits() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(6, 4, generator=g) * 3 for k in (FUSED, "a", "b", "c")}


def test_poe_equals_lsm_of_summed_logits(logits) -> None:
    got = product_of_experts(logits)
    assert torch.allclose(got, F.log_softmax(sum(logits.values()), -1), atol=1e-5)
    # and equals renormalised summed log-softmaxes, term by term
    s = sum(F.log_softmax(z, -1) for z in logits.values())
    assert torch.allclose(got, s - s.logsumexp(-1, keepdim=True), atol=1e-5)


def test_dropping_a_term_stays_normalised(logits) -> None:
    present = {"b": torch.tensor([True, False, True, False, True, False])}
    got = product_of_experts(logits, present)
    # in probability space: the product of the present experts' posteriors, renormalised
    probs = {k: F.softmax(z, -1) for k, z in logits.items()}
    b_term = torch.where(present["b"].unsqueeze(-1), probs["b"], torch.ones_like(probs["b"]))
    product = probs[FUSED] * probs["a"] * probs["c"] * b_term
    assert torch.allclose(got.exp(), product / product.sum(-1, keepdim=True), atol=1e-6)
    without_b = F.log_softmax(logits[FUSED] + logits["a"] + logits["c"], -1)
    with_b = F.log_softmax(sum(logits.values()), -1)
    assert torch.allclose(got[1::2], without_b[1::2], atol=1e-5)
    assert torch.allclose(got[0::2], with_b[0::2], atol=1e-5)
    none = {k: torch.zeros(6, dtype=torch.bool) for k in logits}
    assert torch.allclose(
        product_of_experts(logits, none), torch.full((6, 4), -torch.log(torch.tensor(4.0)))
    )


def test_i2m2_rule_and_loss(logits) -> None:
    model = I2M2(input_shapes=SHAPES, num_classes=4, embed_dim=8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    expected = F.log_softmax(sum(logits.values()), -1)
    assert torch.allclose(model.predict_log_proba(logits), expected, atol=1e-5)
    losses = model.objectives(logits, y)
    assert list(losses) == ["product"]  # one CE on the product, no auxiliary losses
    assert torch.allclose(losses["product"], F.nll_loss(expected, y), atol=1e-5)
    # missing modality 'a' for sample 0: its term is dropped, the joint expert stays (imputed)
    present = {m: torch.ones(6, dtype=torch.bool) for m in SHAPES}
    present["a"][0] = False
    got = model.predict_log_proba(logits, present)[0]
    expected_a = F.log_softmax(logits[FUSED] + logits["b"] + logits["c"], -1)[0]
    assert torch.allclose(got, expected_a, atol=1e-5)
    model.missing_joint = "drop"
    got = model.predict_log_proba(logits, present)[0]
    assert torch.allclose(got, F.log_softmax(logits["b"] + logits["c"], -1)[0], atol=1e-5)


def test_intra_only_modes(logits) -> None:
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    uni = {m: logits[m] for m in SHAPES}
    joint = IntraOnly(input_shapes=SHAPES, num_classes=4, embed_dim=8)
    expected = F.log_softmax(sum(uni.values()), -1)
    assert torch.allclose(joint.predict_log_proba(uni), expected, atol=1e-5)
    assert torch.allclose(joint.objectives(uni, y)["product"], F.nll_loss(expected, y), atol=1e-5)
    indep = IntraOnly(mode="independent", input_shapes=SHAPES, num_classes=4, embed_dim=8)
    losses = indep.objectives(uni, y)
    assert set(losses) == set(SHAPES)
    for m in SHAPES:
        assert torch.allclose(losses[m], F.cross_entropy(uni[m], y))
    assert torch.allclose(indep.predict_log_proba(uni), expected, atol=1e-5)


def test_forward_outputs_per_strategy() -> None:
    torch.manual_seed(0)
    inputs = {m: torch.randn(2, *s) for m, s in SHAPES.items()}
    kw = {"input_shapes": SHAPES, "num_classes": 4, "embed_dim": 8}
    assert set(InterOnly(**kw)(inputs)) == {FUSED}
    assert set(IntraOnly(**kw)(inputs)) == set(SHAPES)
    out = I2M2(**kw)(inputs)
    assert set(out) == {FUSED, *SHAPES} and all(v.shape == (2, 4) for v in out.values())
    # I2M2's joint and unimodal experts do not share encoders
    i2m2 = I2M2(**kw)
    joint_ids = {id(p) for p in i2m2.joint.parameters()}
    assert not joint_ids & {id(p) for p in i2m2.experts.parameters()}


def test_multilabel_product_of_experts_adds_logits_per_label() -> None:
    torch.manual_seed(0)
    z = {"a": torch.randn(5, 4) * 3, "b": torch.randn(5, 4) * 3}
    out = product_of_experts(z, multilabel=True)
    # Bernoulli experts: p(on) / p(off) multiply, i.e. logits add; log p(on) = logsigmoid(sum)
    torch.testing.assert_close(out, F.logsigmoid(z["a"] + z["b"]))
    present = {"a": torch.tensor([True, False, True, True, True]), "b": None}
    dropped = product_of_experts(z, present, multilabel=True)
    torch.testing.assert_close(dropped[1], F.logsigmoid(z["b"][1]))


def test_multilabel_nll_is_binary_cross_entropy() -> None:
    model = InterOnly(input_shapes={"a": [3]}, num_classes=4, multilabel=True)
    z = torch.tensor([[-40.0, 0.0, 3.0, 40.0], [1.0, -2.0, 0.5, 0.0]])
    t = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    expected = F.binary_cross_entropy_with_logits(z, t)
    torch.testing.assert_close(model.loss(z, t), expected)
    torch.testing.assert_close(model.nll(model.log_proba(z), t), expected, atol=1e-5, rtol=1e-5)
    assert model.predicted(model.log_proba(z)).tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]
