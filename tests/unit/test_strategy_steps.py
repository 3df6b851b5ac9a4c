"""Every strategy's training update and evaluation, against an independent computation.

Each test trains a tiny model for two SGD steps through a real Lightning ``Trainer`` and replays the
same two steps here, from the same initial weights and the same batches, with the strategy's
formula written out from ``docs/methods.md`` (losses, gradient rows, combining rule) using nothing
from :mod:`mmlearn.strategies` or :mod:`mmlearn.gradients` but the modules' weights. The
parameters after the steps, the logged diagnostics and the test metrics must agree.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor, nn

from mmlearn.data import SyntheticMultimodal
from mmlearn.gradients import MGDA, Sum
from mmlearn.strategies import BOGC, I2M2, MIMO, InterOnly, IntraOnly, MultiObjective
from reference import (  # noqa: I001  (tests/reference.py)
    ds_weights,
    expert_logits,
    groups_of,
    late_outputs,
    macro_f1,
    rows_of,
)

LR = 0.1
K = 3
DATA = {
    "num_modalities": 3,
    "dim": [5, 4, 3],
    "num_classes": K,
    "n_train": 48,
    "n_val": 12,
    "n_test": 30,
    "batch_size": 24,
    "intra": [1.0, 0.5, 0.2],
    "inter": 1.0,
    "seed": 0,
}
Batches = list[tuple[dict[str, Tensor], Tensor]]


def build(cls: type, **kw: object) -> tuple[pl.LightningModule, SyntheticMultimodal]:
    torch.manual_seed(0)
    data = SyntheticMultimodal(**DATA)  # type: ignore[arg-type]
    model = cls(
        input_shapes=data.input_shapes,
        num_classes=K,
        embed_dim=6,
        head_hidden=8,
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        **kw,
    )
    return model, data


def train(model: pl.LightningModule, data: SyntheticMultimodal, steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def epoch_batches(data: SyntheticMultimodal, epochs: int = 1) -> Batches:
    """The batches of the first ``epochs`` epochs in the order the Trainer sees them."""
    loader = data.train_dataloader()
    out = []
    for epoch in range(epochs):
        loader.batch_sampler.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        out += [(dict(b.inputs), b.target) for b in loader]
    return out


def step_metric(trainer: pl.Trainer, key: str) -> float:
    return float(trainer.callback_metrics[f"{key}_step"])


def assert_same_params(trained: nn.Module, replayed: nn.Module, atol: float = 2e-6) -> None:
    moved = 0
    for (name, a), b in zip(trained.named_parameters(), replayed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        moved += 1
    assert moved


# ---- independent forward passes --------------------------------------------------------------
def joint_logits(joint: nn.Module, x: Mapping[str, Tensor]) -> Tensor:
    feats = {m: enc(x[m]) for m, enc in joint.encoders.items()}
    return joint.head(joint.fusion(feats))


# ---- replay of automatic optimisation ---------------------------------------------------------
def replay_loss(model: nn.Module, batches: Batches, loss: Callable[..., Tensor], steps: int = 2):
    """Plain SGD on ``loss(model, x, y, step)``."""
    for t in range(steps):
        x, y = batches[t % len(batches)]
        model.zero_grad()
        loss(model, x, y, t).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
    return model


def inter_loss(model: nn.Module, x: Mapping[str, Tensor], y: Tensor, t: int) -> Tensor:
    return F.cross_entropy(joint_logits(model.joint, x), y)


def intra_joint_loss(model: nn.Module, x: Mapping[str, Tensor], y: Tensor, t: int) -> Tensor:
    # the normalised product of experts: lsm(sum_m lsm(z_m)) = lsm(sum_m z_m)
    logp = sum(F.log_softmax(z, -1) for z in expert_logits(model, x).values())
    return F.nll_loss(logp - logp.logsumexp(-1, keepdim=True), y)


def intra_independent_loss(model: nn.Module, x: Mapping[str, Tensor], y: Tensor, t: int) -> Tensor:
    return sum(F.cross_entropy(z, y) for z in expert_logits(model, x).values())  # type: ignore[return-value]


def i2m2_loss(model: nn.Module, x: Mapping[str, Tensor], y: Tensor, t: int) -> Tensor:
    terms = [joint_logits(model.joint, x), *expert_logits(model, x).values()]
    s = sum(F.log_softmax(z, -1) for z in terms)
    return F.nll_loss(s - s.logsumexp(-1, keepdim=True), y)


def heads_sum_loss(model: nn.Module, x: Mapping[str, Tensor], y: Tensor, t: int) -> Tensor:
    return sum(F.cross_entropy(z, y) for z in late_outputs(model, x).values())  # type: ignore[return-value]


def mimo_loss(mu: float, gamma: Callable[[int], float]) -> Callable[..., Tensor]:
    def loss(model: nn.Module, x: Mapping[str, Tensor], y: Tensor, t: int) -> Tensor:
        out = late_outputs(model, x)
        uni = torch.stack([F.cross_entropy(out[m], y) for m in model.modalities])
        return F.cross_entropy(out["fused"], y) + gamma(t) * mu * torch.logsumexp(uni / mu, 0)

    return loss


AUTOMATIC = [
    pytest.param(InterOnly, {}, inter_loss, id="InterOnly"),
    pytest.param(IntraOnly, {}, intra_joint_loss, id="IntraOnly-joint"),
    pytest.param(IntraOnly, {"mode": "independent"}, intra_independent_loss, id="IntraOnly-indep"),
    pytest.param(I2M2, {}, i2m2_loss, id="I2M2"),
    pytest.param(MultiObjective, {}, heads_sum_loss, id="heads-reference"),
    pytest.param(
        MIMO,
        {"mu": 0.3, "gamma": 2.0, "gamma_power": 0.5, "gamma_max": 2.5},
        mimo_loss(0.3, lambda t: min(2.0 * (1 + t) ** 0.5, 2.5)),
        id="MIMO",
    ),
]


@pytest.mark.parametrize(("cls", "kw", "loss"), AUTOMATIC)
def test_automatic_strategies_minimise_their_documented_objective(cls, kw, loss) -> None:
    model, data = build(cls, **kw)
    replayed = copy.deepcopy(model)
    batches = epoch_batches(data)
    trainer = train(model, data)
    replay_loss(replayed, batches, loss)
    assert_same_params(model, replayed)
    # train/loss is the objective the strategy minimised, at the last step's weights
    before_last = replay_loss(copy.deepcopy(build(cls, **kw)[0]), batches, loss, steps=1)
    x, y = batches[1]
    with torch.no_grad():
        expected = float(loss(before_last, x, y, 1))
    if cls is not MIMO:  # MIMO logs its surrogate, whose gradient (not value) is F's
        assert step_metric(trainer, "train/loss") == pytest.approx(expected, rel=1e-5)


def test_mimo_logs_the_modality_weights_and_the_penalty_schedule() -> None:
    mu = 0.1
    model, data = build(MIMO, mu=mu, gamma=2.0, gamma_power=0.5, gamma_max=2.5)
    first = copy.deepcopy(model)
    batches = epoch_batches(data)
    trainer = train(model, data)
    gamma = lambda t: min(2.0 * (1 + t) ** 0.5, 2.5)  # noqa: E731
    after_one = replay_loss(first, batches, mimo_loss(mu, gamma), steps=1)
    x, y = batches[1]
    with torch.no_grad():
        out = late_outputs(after_one, x)
        uni = torch.tensor([float(F.cross_entropy(out[m], y)) for m in model.modalities])
    pi = torch.exp(uni / mu) / torch.exp(uni / mu).sum()
    for i, m in enumerate(model.modalities):
        assert step_metric(trainer, f"train/pi/{m}") == pytest.approx(float(pi[i]), rel=1e-5)
    assert float(pi.max() - pi.min()) > 0.1  # far from uniform: the check has teeth
    assert step_metric(trainer, "train/gamma") == pytest.approx(gamma(1))  # 2 * sqrt(2) capped


# ---- replay of the Jacobian path ---------------------------------------------------------------
def apply(model: nn.Module, combined: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, params, _ in groups_of(model):
            start = 0
            for p in params:
                p -= LR * combined[name][start : start + p.numel()].view_as(p)
                start += p.numel()


def min_norm_pair(r: Tensor) -> Tensor:
    """The point of the segment [r0, r1] closest to the origin, by a bounded 1-D search."""
    a, b = r[0].double(), r[1].double()
    res = minimize_scalar(
        lambda t: float((t * a + (1 - t) * b).square().sum()),
        bounds=(0, 1),
        method="bounded",
        options={"xatol": 1e-12},
    )
    return (res.x * a + (1 - res.x) * b).to(r.dtype)


def replay_manual(model: nn.Module, batches: Batches, rule: Callable[..., Tensor], steps: int = 2):
    """SGD on the combined rows; ``rule(name, rows, t)`` returns the group's update."""
    log = []
    for t in range(steps):
        x, y = batches[t % len(batches)]
        rows = rows_of(model, x, y)
        combined = {name: rule(name, r, t) for name, r in rows.items()}
        log.append(rows)
        apply(model, combined)
    return model, log


def test_the_jacobian_path_with_sum_and_clipping_is_the_clipped_summed_gradient() -> None:
    clip = 0.05
    model, data = build(MultiObjective, rule=Sum(), clip_grad_norm=clip)
    replayed = copy.deepcopy(model)
    batches = epoch_batches(data)
    train(model, data)
    for t in range(2):
        x, y = batches[t]
        rows = rows_of(replayed, x, y)
        total = torch.cat([r.sum(0) for r in rows.values()]).norm()
        assert total > 2 * clip  # the clip is active
        apply(replayed, {n: r.sum(0) * clip / total for n, r in rows.items()})
    assert_same_params(model, replayed)


def test_mgda_takes_the_min_norm_point_of_each_encoders_two_gradients() -> None:
    model, data = build(MultiObjective, rule=MGDA())
    replayed = copy.deepcopy(model)
    batches = epoch_batches(data)
    trainer = train(model, data)
    replayed, log = replay_manual(
        replayed, batches, lambda n, r, t: min_norm_pair(r) if len(r) == 2 else r[0]
    )
    assert_same_params(model, replayed)
    last = log[-1]
    for m in model.modalities:
        r = last[f"encoder.{m}"]
        cos = float(F.cosine_similarity(r[0], r[1], dim=0))
        assert step_metric(trainer, f"train/cos/{m}") == pytest.approx(cos, abs=1e-5)
        # the logged weight of the fused objective is the segment parameter of the min-norm point
        a, b, d = r[0].double(), r[1].double(), min_norm_pair(r).double()
        w = float((d - b) @ (a - b) / (a - b).square().sum())
        assert step_metric(trainer, f"train/weight/encoder.{m}/fused") == pytest.approx(w, abs=1e-4)


def test_bogc_ema_weights_follow_the_exponentially_weighted_variance() -> None:
    beta = 0.7  # not 0.5, where beta and 1 - beta coincide
    model, data = build(BOGC, beta=beta)
    replayed = copy.deepcopy(model)
    batches = epoch_batches(data, epochs=2)
    trainer = train(model, data, steps=3)
    history: dict[str, list[Tensor]] = {}
    weights: dict[str, Tensor] = {}

    def rule(name: str, r: Tensor, t: int) -> Tensor:
        history.setdefault(name, []).append(r)
        if len(r) == 1:
            return r[0]
        # E_w[(g - E_w g)^2] with weights beta^(t - i) over the steps so far
        w = torch.tensor([beta ** (t - i) for i in range(t + 1)])[:, None, None]
        past = torch.stack(history[name])
        mean = (w * past).sum(0) / w.sum()
        var = (w * (past - mean) ** 2).sum(0) / w.sum()
        weights[name] = ds_weights(var)
        return len(r) * (weights[name] * r).sum(0)

    replayed, _ = replay_manual(replayed, batches, rule, steps=3)
    assert_same_params(model, replayed, atol=1e-5)
    for m in model.modalities:
        w_fused = float(weights[f"encoder.{m}"][0].mean())
        got = step_metric(trainer, f"train/weight/encoder.{m}/fused")
        assert got == pytest.approx(w_fused, abs=1e-4)
    # the calibration is not the plain sum on the later steps (else this test proves little)
    assert max(float((w[0] - 0.5).abs().max()) for w in weights.values()) > 0.2


def test_bogc_microbatch_calibrates_with_the_chunks_sample_variance() -> None:
    model, data = build(BOGC, variance="microbatch", n_chunks=4)
    replayed = copy.deepcopy(model)
    batches = epoch_batches(data)
    train(model, data)
    for t in range(2):
        x, y = batches[t]
        chunks = [
            rows_of(
                replayed, {m: v[c * 6 : (c + 1) * 6] for m, v in x.items()}, y[c * 6 : (c + 1) * 6]
            )
            for c in range(4)
        ]
        combined = {}
        for name in chunks[0]:
            stack = torch.stack([c[name] for c in chunks])  # [chunks, n, P]
            mean, var = stack.mean(0), stack.var(0, unbiased=True)
            combined[name] = (
                mean[0] if len(mean) == 1 else len(mean) * (ds_weights(var) * mean).sum(0)
            )
        apply(replayed, combined)
    assert_same_params(model, replayed, atol=1e-5)


def test_bogc_last_layer_variance_is_the_per_sample_gradient_variance() -> None:
    model, data = build(BOGC, variance="last_layer")
    replayed = copy.deepcopy(model)
    batches = epoch_batches(data)
    train(model, data)

    def last_linear(k: str) -> nn.Linear:
        head = replayed.joint.head if k == "fused" else replayed.heads[k]
        return [m for m in head.modules() if isinstance(m, nn.Linear)][-1]

    for t in range(2):
        x, y = batches[t]
        var_k = {}
        for k in ["fused", *replayed.modalities]:
            layer = last_linear(k)
            per_sample = []
            for i in range(len(y)):
                z = late_outputs(replayed, {m: v[i : i + 1] for m, v in x.items()})[k]
                gw, gb = torch.autograd.grad(
                    F.cross_entropy(z, y[i : i + 1]), [layer.weight, layer.bias]
                )
                per_sample.append(torch.cat([gw, gb[:, None]], 1))
            var_k[k] = torch.stack(per_sample).var(0, unbiased=False).mean()
        rows = rows_of(replayed, x, y)
        combined = {}
        for name, _, objectives in groups_of(replayed):
            r = rows[name]
            if len(r) == 1:
                combined[name] = r[0]
                continue
            var = torch.stack([var_k[k].expand(r.shape[1]) for k in objectives])
            combined[name] = len(r) * (ds_weights(var) * r).sum(0)
        apply(replayed, combined)
    assert_same_params(model, replayed, atol=1e-5)


# ---- evaluation ---------------------------------------------------------------------------------
EVAL = [
    pytest.param(InterOnly, {}, id="InterOnly"),
    pytest.param(IntraOnly, {}, id="IntraOnly"),
    pytest.param(I2M2, {}, id="I2M2"),
    pytest.param(MIMO, {}, id="MIMO"),
]


@pytest.mark.parametrize(("cls", "kw"), EVAL)
def test_test_metrics_and_predictions_follow_the_inference_rule(cls, kw) -> None:
    model, data = build(cls, **kw)
    trainer = train(model, data, steps=4)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    test = data.splits["test"]
    x, y = test.inputs, test.target
    model.eval()
    with torch.no_grad():
        if cls is InterOnly:
            logits = {"fused": joint_logits(model.joint, x)}
            terms = [logits["fused"]]
        elif cls is MIMO:
            logits = late_outputs(model, x)
            terms = [logits["fused"]]
        else:
            logits = expert_logits(model, x)
            if cls is I2M2:
                logits["fused"] = joint_logits(model.joint, x)
            terms = list(logits.values())
    s = sum(F.log_softmax(z, -1) for z in terms)
    log_probs = s - s.logsumexp(-1, keepdim=True)
    pred = log_probs.argmax(-1)
    assert metrics["test/acc"] == pytest.approx(float((pred == y).float().mean()), abs=1e-6)
    assert metrics["test/f1"] == pytest.approx(macro_f1(y.numpy(), pred.numpy(), K), abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(float(F.nll_loss(log_probs, y)), rel=1e-5)
    for m in model.modalities if model.has_experts else []:
        acc_m = float((logits[m].argmax(-1) == y).float().mean())
        assert metrics[f"test/acc/{m}"] == pytest.approx(acc_m, abs=1e-6)
    out = trainer.predict(model, datamodule=data)
    assert out is not None
    got = torch.cat([o["log_probs"] for o in out])  # type: ignore[index]
    torch.testing.assert_close(got, log_probs, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([o["pred"] for o in out]), pred)  # type: ignore[index]
    assert torch.equal(torch.cat([o["target"] for o in out]), y)  # type: ignore[index]
