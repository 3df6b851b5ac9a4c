"""The likelihoods (mmlearn.likelihood) against plain torch and the formulas in tests/reference.py.

Categorical: softmax over K classes, class-index targets. Bernoulli: K independent sigmoids,
multi-hot targets. Each owns its loss, log-probabilities, NLL, decision, product of experts
(optionally with the prior divided out), metric input and classes, and the per-sample gradient
of the loss with respect to the logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from mmlearn.errors import MMLearnError
from mmlearn.heads import product_of_experts
from mmlearn.likelihood import Bernoulli, Categorical, Likelihood, likelihood
from reference import multilabel_ce, prior_divided_bernoulli, prior_divided_product  # noqa: I001

B, K = 6, 4


@pytest.fixture
def z() -> torch.Tensor:
    return torch.randn(B, K, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3, 3, 1])


@pytest.fixture
def multihot() -> torch.Tensor:
    return torch.randint(0, 2, (B, K), generator=torch.Generator().manual_seed(1))


def test_factory_picks_by_the_multilabel_flag() -> None:
    assert isinstance(likelihood(False), Categorical) and not likelihood(False).multilabel
    assert isinstance(likelihood(True), Bernoulli) and likelihood(True).multilabel
    assert isinstance(likelihood(True), Likelihood)


# ---- loss, log-probabilities, NLL, decision --------------------------------------------------
def test_categorical_loss_log_proba_nll_and_decision(z, labels) -> None:
    lik = Categorical()
    torch.testing.assert_close(lik.loss(z, labels), F.cross_entropy(z, labels))
    lp = lik.log_proba(z)
    torch.testing.assert_close(lp.exp(), torch.softmax(z, -1))
    torch.testing.assert_close(lik.nll(lp, labels), F.cross_entropy(z, labels))
    assert torch.equal(lik.predicted(lp), z.argmax(-1))
    assert torch.equal(lik.metric_input(lp), lp)  # the multiclass metrics take the argmax


def test_bernoulli_loss_log_proba_nll_and_decision(z, multihot) -> None:
    lik = Bernoulli()
    expected = multilabel_ce(z, multihot)
    torch.testing.assert_close(lik.loss(z, multihot), expected)
    torch.testing.assert_close(lik.loss(z, multihot.bool()), expected)  # bool targets too
    lp = lik.log_proba(z)
    torch.testing.assert_close(lp.exp(), torch.sigmoid(z))
    torch.testing.assert_close(lik.nll(lp, multihot), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(lik.predicted(lp), (torch.sigmoid(z) > 0.5).long())
    # probabilities: the multi-label metrics threshold them at 0.5
    torch.testing.assert_close(lik.metric_input(lp), torch.sigmoid(z))


def test_bernoulli_nll_is_finite_where_p_is_one() -> None:
    lik = Bernoulli()
    z = torch.tensor([[60.0, -60.0]])
    nll = lik.nll(lik.log_proba(z), torch.tensor([[1, 0]]))
    assert torch.isfinite(nll) and float(nll) < 1e-6


@pytest.mark.parametrize("lik", [Categorical(), Bernoulli()], ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_log_probabilities_are_float32(lik: Likelihood, dtype: torch.dtype, z) -> None:
    assert lik.log_proba(z.to(dtype)).dtype == torch.float32
    assert lik.product_of_experts({"a": z.to(dtype)}).dtype == torch.float32


# ---- dL_i / dz_i -------------------------------------------------------------------------------
def test_categorical_residual_is_each_samples_gradient(z, labels) -> None:
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(zz, labels, reduction="sum"), zz)
    torch.testing.assert_close(Categorical().residual(z, labels), g)


def test_bernoulli_residual_is_each_samples_gradient(z, multihot) -> None:
    zz = z.clone().requires_grad_(True)
    # each sample's loss is the mean binary CE over its K labels
    per_sample = sum(multilabel_ce(zz[i : i + 1], multihot[i : i + 1]) for i in range(B))
    (g,) = torch.autograd.grad(per_sample, zz)
    torch.testing.assert_close(Bernoulli().residual(z, multihot), g)


# ---- metrics -----------------------------------------------------------------------------------
def test_metric_classes() -> None:
    acc, f1 = Categorical().accuracy(K), Categorical().f1(K)
    assert isinstance(acc, MulticlassAccuracy) and acc.average == "micro"
    assert isinstance(f1, MulticlassF1Score) and f1.average == "macro"
    acc, f1 = Bernoulli().accuracy(K), Bernoulli().f1(K)
    assert isinstance(acc, MultilabelAccuracy) and acc.average == "micro"
    assert isinstance(f1, MultilabelF1Score) and f1.average == "macro"
    assert acc.num_labels == K == f1.num_labels


# ---- product of experts ------------------------------------------------------------------------
def test_categorical_product_without_prior_is_the_normalised_product(z) -> None:
    logits = {"a": z, "b": z.flip(0), "c": z.roll(1, -1)}
    got = Categorical().product_of_experts(logits)
    probs = {m: torch.softmax(v, -1).numpy() for m, v in logits.items()}
    expected = prior_divided_product(probs, np.ones(K))  # a flat prior divides out nothing
    np.testing.assert_allclose(got.exp().numpy(), expected, atol=1e-6)
    # the wrapper in mmlearn.heads is the same rule
    torch.testing.assert_close(product_of_experts(logits), got)


def test_uninformative_experts_give_back_the_prior() -> None:
    """Two experts that each output the prior [0.1, 0.9]: the posterior is the prior."""
    prior = torch.tensor([0.1, 0.9])
    lik = Categorical()
    z = prior.log().expand(3, 2)
    plain = lik.product_of_experts({"a": z, "b": z}).exp()
    # without the correction the prior is counted twice: 0.01 / (0.01 + 0.81)
    torch.testing.assert_close(plain[0], torch.tensor([0.01 / 0.82, 0.81 / 0.82]))
    got = lik.product_of_experts({"a": z, "b": z}, prior_logits=lik.prior_logits(prior)).exp()
    torch.testing.assert_close(got, prior.expand(3, 2))


def test_categorical_product_divides_the_prior_out_once_per_extra_expert() -> None:
    g = torch.Generator().manual_seed(2)
    logits = {m: torch.randn(8, 5, generator=g) * 2 for m in ("a", "b", "c")}
    prior = torch.rand(5, generator=g) + 0.05
    prior = prior / prior.sum()
    lik = Categorical()
    got = lik.product_of_experts(logits, prior_logits=lik.prior_logits(prior))
    probs = {m: torch.softmax(v, -1).numpy() for m, v in logits.items()}
    expected = prior_divided_product(probs, prior.numpy())
    np.testing.assert_allclose(got.exp().numpy(), expected, rtol=1e-5, atol=1e-6)
    # counts (frequencies not summing to 1) give the same posterior
    counts = lik.prior_logits(prior * 37)
    torch.testing.assert_close(lik.product_of_experts(logits, prior_logits=counts), got)


def test_categorical_product_with_missing_experts_drops_a_prior_factor_with_each() -> None:
    g = torch.Generator().manual_seed(3)
    logits = {m: torch.randn(6, 3, generator=g) * 2 for m in ("a", "b", "c")}
    prior = torch.tensor([0.2, 0.5, 0.3])
    present = {
        "a": torch.tensor([True, False, True, False, False, True]),
        "b": torch.tensor([True, True, False, False, False, True]),
        "c": torch.tensor([True, True, True, True, False, False]),
    }
    lik = Categorical()
    got = lik.product_of_experts(logits, present, lik.prior_logits(prior))
    probs = {m: torch.softmax(v, -1).numpy() for m, v in logits.items()}
    np_present = {m: v.numpy() for m, v in present.items()}
    expected = prior_divided_product(probs, prior.numpy(), np_present)
    np.testing.assert_allclose(got.exp().numpy(), expected, rtol=1e-5, atol=1e-6)
    # one expert present: its own posterior; none present: the prior
    np.testing.assert_allclose(got[3].exp().numpy(), probs["c"][3], rtol=1e-5)
    np.testing.assert_allclose(got[4].exp().numpy(), prior.numpy(), rtol=1e-5)


def test_bernoulli_product_divides_each_labels_prior_out() -> None:
    g = torch.Generator().manual_seed(4)
    logits = {m: torch.randn(7, K, generator=g) * 2 for m in ("a", "b", "c")}
    rates = torch.tensor([0.1, 0.5, 0.7, 0.95])
    present = {"a": torch.tensor([True, False, True, True, False, True, False]), "b": None}
    lik = Bernoulli()
    probs = {m: torch.sigmoid(v).numpy() for m, v in logits.items()}
    # without a prior: logits add, p(on) = sigmoid(sum z) (a rate of 1/2 divides out nothing)
    torch.testing.assert_close(lik.product_of_experts(logits), F.logsigmoid(sum(logits.values())))
    for mask in (None, present):
        got = lik.product_of_experts(logits, mask, lik.prior_logits(rates))
        np_mask = None if mask is None else {"a": present["a"].numpy()}
        expected = prior_divided_bernoulli(probs, rates.numpy(), np_mask)
        np.testing.assert_allclose(got.exp().numpy(), expected, rtol=1e-5, atol=1e-6)
    # the closed form: logit = sum_m z_m - (M - 1) logit(r)
    full = lik.product_of_experts(logits, None, lik.prior_logits(rates))
    logit_r = torch.log(rates / (1 - rates))
    torch.testing.assert_close(full, F.logsigmoid(sum(logits.values()) - 2 * logit_r))


def test_bernoulli_uninformative_experts_give_back_the_rates() -> None:
    rates = torch.tensor([0.1, 0.6, 0.9])
    lik = Bernoulli()
    z = torch.logit(rates).expand(2, 3)
    got = lik.product_of_experts({"a": z, "b": z, "c": z}, None, lik.prior_logits(rates)).exp()
    torch.testing.assert_close(got, rates.expand(2, 3))


def test_prior_logits_are_the_logits_of_the_prior() -> None:
    f = torch.tensor([0.2, 0.3, 0.5])
    torch.testing.assert_close(torch.softmax(Categorical().prior_logits(f), -1), f)
    torch.testing.assert_close(torch.sigmoid(Bernoulli().prior_logits(f)), f)
    # a class never seen in training (or a label always on) gives a finite correction
    assert torch.isfinite(Categorical().prior_logits(torch.tensor([0.0, 1.0]))).all()
    assert torch.isfinite(Bernoulli().prior_logits(torch.tensor([0.0, 1.0]))).all()


@pytest.mark.parametrize(
    ("lik", "bad"),
    [
        (Categorical(), torch.zeros(3)),
        (Categorical(), torch.tensor([0.5, -0.1, 0.6])),
        (Categorical(), torch.tensor([[0.5, 0.5]])),
        (Bernoulli(), torch.tensor([0.5, 1.5])),
        (Bernoulli(), torch.tensor([0.5, float("nan")])),
    ],
)
def test_prior_logits_refuse_bad_frequencies(lik: Likelihood, bad: torch.Tensor) -> None:
    with pytest.raises(MMLearnError, match="frequencies"):
        lik.prior_logits(bad)


def test_a_product_needs_an_expert() -> None:
    with pytest.raises(MMLearnError, match="at least one expert"):
        Categorical().product_of_experts({})


@pytest.mark.parametrize("lik", [Categorical(), Bernoulli()], ids=["categorical", "bernoulli"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_absent_experts_non_finite_logits_do_not_reach_the_result(
    lik: Likelihood, bad: float
) -> None:
    """Found by an independent review: masking by multiplication made 0 * nan = nan."""
    b = torch.tensor([[0.5, 0.0, -0.5], [0.2, 0.1, 0.0]])
    a = torch.tensor([[bad, 0.0, 0.0], [1.0, 2.0, 3.0]])
    present = {"a": torch.tensor([False, True]), "b": torch.tensor([True, True])}
    prior = lik.prior_logits(torch.tensor([0.2, 0.3, 0.5]))
    got = lik.product_of_experts({"a": a, "b": b}, present, prior)
    alone = lik.product_of_experts({"b": b[:1]}, None, prior)
    torch.testing.assert_close(got[:1], alone)
    assert bool(torch.isfinite(got).all())


def test_a_class_never_seen_in_training_is_warned_about() -> None:
    with pytest.warns(UserWarning, match=r"class \[0\] with training frequency \[0.0\]"):
        Categorical().prior_logits(torch.tensor([0.0, 0.3, 0.7]))
    with pytest.warns(UserWarning, match=r"label \[1\] with training frequency \[1.0\]"):
        Bernoulli().prior_logits(torch.tensor([0.4, 1.0]))
