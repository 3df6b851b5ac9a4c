"""Product-of-experts identities of IntraOnly and I2M2 on hand-made logits (docs/methods.md 2-3).

Including IntraOnly's independent mode, whose separately calibrated experts have the class prior
divided out of their product, compared with the formula written out in tests/reference.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import Given, quiet_trainer  # noqa: I001  (tests/helpers.py)
from mmlearn.data.base import Split
from mmlearn.errors import MMLearnError
from mmlearn.heads import product_of_experts
from mmlearn.strategies import FUSED, I2M2, InterOnly, IntraOnly
from reference import expert_logits, prior_divided_bernoulli, prior_divided_product  # noqa: I001

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


# ---- IntraOnly(mode="independent"): the prior counted once (docs/methods.md section 2) ---------
TWO = {"a": [4], "b": [3]}


def _frequencies(train: torch.Tensor, k: int, multilabel: bool = False) -> Given:
    """Two modalities; train targets with set class frequencies, val/test with other ones."""
    g = torch.Generator().manual_seed(0)

    def split(target: torch.Tensor) -> Split:
        n = len(target)
        return Split({m: torch.randn(n, *s, generator=g) for m, s in TWO.items()}, target)

    other = torch.roll(train, 3, 0)[:7].flip(0)
    splits = {"train": split(train), "val": split(other), "test": split(other)}
    return Given(splits, k, multilabel, batch_size=8)


def _softmax(logits: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {m: F.softmax(z.double(), -1).numpy() for m, z in logits.items()}


def test_independent_uninformative_experts_give_back_the_prior() -> None:
    model = IntraOnly(
        mode="independent", input_shapes=TWO, num_classes=2, class_frequencies=[0.1, 0.9]
    )
    z = torch.tensor([0.1, 0.9]).log().expand(5, 2)  # each expert's posterior is the prior
    got = model.predict_log_proba({"a": z, "b": z}).exp()
    # the plain product gives 0.01 / (0.01 + 0.81) = 0.012 for the first class
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.9]]).expand(5, 2))


def test_independent_product_divides_the_prior_by_formula() -> None:
    g = torch.Generator().manual_seed(5)
    logits = {m: torch.randn(9, 4, generator=g) * 2 for m in SHAPES}
    prior = np.array([0.05, 0.15, 0.3, 0.5])
    model = IntraOnly(
        mode="independent", input_shapes=SHAPES, num_classes=4, class_frequencies=prior.tolist()
    )
    expected = prior_divided_product(_softmax(logits), prior)
    got = model.predict_log_proba(logits).exp().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # a missing modality drops its expert AND one factor of the prior
    present = {
        "a": torch.tensor([True, False, True, True, False, False, True, True, False]),
        "b": torch.tensor([True, True, False, True, False, True, False, True, False]),
        "c": torch.tensor([True, True, True, False, True, False, False, True, False]),
    }
    np_present = {m: v.numpy() for m, v in present.items()}
    expected = prior_divided_product(_softmax(logits), prior, np_present)
    got = model.predict_log_proba(logits, present).exp().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # sample 4 has only 'c': its own posterior; sample 8 has none: the prior
    np.testing.assert_allclose(got[4], _softmax(logits)["c"][4], rtol=1e-5)
    np.testing.assert_allclose(got[8], prior, rtol=1e-5)


def test_independent_multilabel_product_divides_each_labels_prior() -> None:
    g = torch.Generator().manual_seed(6)
    logits = {m: torch.randn(5, 3, generator=g) * 2 for m in TWO}
    rates = np.array([0.1, 0.5, 0.8])
    model = IntraOnly(
        mode="independent",
        input_shapes=TWO,
        num_classes=3,
        multilabel=True,
        class_frequencies=rates.tolist(),
    )
    probs = {m: torch.sigmoid(z.double()).numpy() for m, z in logits.items()}
    present = {"a": torch.tensor([True, False, True, False, True])}
    for mask in (None, present):
        np_mask = None if mask is None else {"a": present["a"].numpy()}
        expected = prior_divided_bernoulli(probs, rates, np_mask)
        got = model.predict_log_proba(logits, mask).exp().double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_the_prior_is_divided_only_in_independent_mode_with_divide_prior() -> None:
    g = torch.Generator().manual_seed(7)
    logits = {m: torch.randn(4, 2, generator=g) for m in TWO}
    plain = F.log_softmax(sum(logits.values()), -1)
    kw = {"input_shapes": TWO, "num_classes": 2, "class_frequencies": [0.1, 0.9]}
    joint = IntraOnly(mode="joint", **kw)  # trained through the product: nothing to divide
    torch.testing.assert_close(joint.predict_log_proba(logits), plain)
    off = IntraOnly(mode="independent", divide_prior=False, **kw)
    torch.testing.assert_close(off.predict_log_proba(logits), plain)
    # built by hand without frequencies: a uniform prior, no effect
    bare = IntraOnly(mode="independent", input_shapes=TWO, num_classes=2)
    assert torch.equal(bare.prior_logits, torch.zeros(2))
    torch.testing.assert_close(bare.predict_log_proba(logits), plain)


def test_class_frequencies_are_those_of_the_training_split() -> None:
    train = torch.tensor([0] * 2 + [1] * 18)
    dm = _frequencies(train, 2)
    torch.testing.assert_close(dm.class_frequencies(), torch.tensor([0.1, 0.9]))
    assert float(dm.splits["val"].target.float().mean()) != pytest.approx(0.9)  # not train's
    # a class absent from training gets frequency 0; multi-label: per-label positive rates
    torch.testing.assert_close(
        _frequencies(train, 3).class_frequencies(), torch.tensor([0.1, 0.9, 0])
    )
    multihot = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]])
    rates = _frequencies(multihot, 3, multilabel=True).class_frequencies()
    torch.testing.assert_close(rates, torch.tensor([0.75, 0.25, 0.75]))


def test_setup_reads_the_training_prior_and_checkpoints_keep_it(tmp_path) -> None:
    torch.manual_seed(0)
    train = torch.tensor([0] * 2 + [1] * 18)
    dm = _frequencies(train, 2)
    sgd0 = functools.partial(torch.optim.SGD, lr=0.0)
    model = IntraOnly(
        mode="independent", input_shapes=TWO, num_classes=2, embed_dim=4, optimizer=sgd0
    )
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    torch.testing.assert_close(model.prior_logits, torch.tensor([0.1, 0.9]).log())
    out = trainer.predict(model, datamodule=dm)
    assert out is not None
    got = torch.cat([o["log_probs"] for o in out]).exp().double().numpy()
    with torch.no_grad():
        z = expert_logits(model, dm.splits["test"].inputs)
    expected = prior_divided_product(_softmax(z), np.array([0.1, 0.9]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # saved with the weights, restored without a DataModule
    assert "prior_logits" in model.state_dict()
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = IntraOnly.load_from_checkpoint(path)
    assert restored.mode == "independent" and restored.divide_prior
    torch.testing.assert_close(restored.prior_logits, model.prior_logits)
    # evaluating a restored model on other data keeps the prior it was trained with
    other = _frequencies(torch.tensor([0] * 5 + [1] * 5), 2)
    quiet_trainer().validate(restored, datamodule=other, verbose=False)
    torch.testing.assert_close(restored.prior_logits, model.prior_logits)
    # a checkpoint written before the buffer existed still loads
    old = torch.load(path, weights_only=False)
    del old["state_dict"]["prior_logits"]
    torch.save(old, path)
    IntraOnly.load_from_checkpoint(path)


def test_evaluating_a_model_without_a_prior_reads_the_datamodules() -> None:
    dm = _frequencies(torch.tensor([0] * 3 + [1] * 1), 2)
    model = IntraOnly(mode="independent", input_shapes=TWO, num_classes=2, embed_dim=4)
    quiet_trainer().validate(model, datamodule=dm, verbose=False)
    torch.testing.assert_close(model.prior_logits, torch.tensor([0.75, 0.25]).log())
    # explicit frequencies win over the DataModule's
    given = IntraOnly(
        mode="independent", input_shapes=TWO, num_classes=2, class_frequencies=[0.5, 0.5]
    )
    quiet_trainer().validate(given, datamodule=dm, verbose=False)
    torch.testing.assert_close(given.prior_logits, torch.tensor([0.5, 0.5]).log())


def test_class_frequencies_must_have_one_value_per_class() -> None:
    with pytest.raises(MMLearnError, match=r"shape \[3\]; expected \[2\]"):
        IntraOnly(mode="independent", input_shapes=TWO, num_classes=2, class_frequencies=[1, 2, 3])
