"""Every strategy's training update and evaluation, against an independent computation.

Each test trains a tiny model for two or three SGD steps through a real Lightning ``Trainer`` and
replays the same steps here, from the same initial weights and the same batches, with the
strategy's formula written out from ``docs/methods.md`` (losses, gradient rows, moments, combining
rule) using nothing from :mod:`mmlearn.strategies` or :mod:`mmlearn.gradients` but the modules'
weights (the references are in ``tests/reference.py``: autograd per objective and group, a generic
QP solver for MGDA, the moving moments from their weights, BOGC's pairwise Dempster-Shafer
weights). The parameters after the steps, the logged diagnostics and the test metrics must agree.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Callable, Mapping

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlearn.data import SyntheticMultimodal
from mmlearn.errors import MMLearnError
from mmlearn.gradients import MGDA, Sum
from mmlearn.strategies import (
    BOGC,
    I2M2,
    MIMO,
    MLA,
    OGMGE,
    STRATEGIES,
    EMAMoments,
    InterOnly,
    IntraOnly,
    LastLayer,
    LateFusionHeads,
    Microbatch,
    MMPareto,
    MultiObjective,
)
from reference import (  # noqa: I001  (tests/reference.py)
    ds_weights,
    ema_moments,
    expert_logits,
    groups_of,
    late_outputs,
    macro_f1,
    min_norm_point,
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
#: the strategy classes some replay below trains (checked against STRATEGIES)
REPLAYED: set[type] = set()


def replayed(*classes: type) -> None:
    REPLAYED.update(classes)


def build(cls: type, **kw: object) -> tuple[pl.LightningModule, SyntheticMultimodal]:
    torch.manual_seed(0)
    data = SyntheticMultimodal(**(DATA | kw.pop("data", {})))  # type: ignore[operator]
    kw.setdefault("embed_dim", 6)
    model = cls(
        input_shapes=data.input_shapes,
        num_classes=K,
        head_hidden=None if cls.linear_fused_head else 8,  # OGM-GE reads a linear head
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


# ---- replay of a loss's plain gradient ---------------------------------------------------------
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
    """``F = L_0 + gamma_t mu logsumexp(L_m / mu)``: its plain gradient is MIMO's update."""

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
    pytest.param(LateFusionHeads, {}, heads_sum_loss, id="LateFusionHeads-automatic-sum"),
    # the manual step with the plain sum (the default rule) is the reference's update
    pytest.param(MultiObjective, {}, heads_sum_loss, id="MultiObjective-default"),
    pytest.param(MultiObjective, {"rule": Sum()}, heads_sum_loss, id="MultiObjective-Sum"),
    pytest.param(
        MIMO,
        {"mu": 0.3, "gamma": 2.0, "gamma_power": 0.5, "gamma_max": 2.5},
        mimo_loss(0.3, lambda t: min(2.0 * (1 + t) ** 0.5, 2.5)),
        id="MIMO",
    ),
]
replayed(*(p.values[0] for p in AUTOMATIC))


@pytest.mark.parametrize(("cls", "kw", "loss"), AUTOMATIC)
def test_strategies_follow_the_plain_gradient_of_their_documented_objective(cls, kw, loss) -> None:
    model, data = build(cls, **kw)
    replayed_model = copy.deepcopy(model)
    batches = epoch_batches(data)
    trainer = train(model, data)
    replay_loss(replayed_model, batches, loss)
    assert_same_params(model, replayed_model)
    # train/loss is that objective (MIMO: F itself), at the last step's weights
    before_last = replay_loss(copy.deepcopy(build(cls, **kw)[0]), batches, loss, steps=1)
    x, y = batches[1]
    with torch.no_grad():
        expected = float(loss(before_last, x, y, 1))
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
        losses = {k: float(F.cross_entropy(z, y)) for k, z in out.items()}
    uni = torch.tensor([losses[m] for m in model.modalities], dtype=torch.float64)
    pi = torch.exp(uni / mu) / torch.exp(uni / mu).sum()
    for i, m in enumerate(model.modalities):
        assert step_metric(trainer, f"train/pi/{m}") == pytest.approx(float(pi[i]), rel=1e-5)
    assert float(pi.max() - pi.min()) > 0.1  # far from uniform: the check has teeth
    assert step_metric(trainer, "train/gamma") == pytest.approx(gamma(1))  # 2 * sqrt(2) capped
    assert gamma(1) == 2.5 and gamma(0) == 2.0
    # train/loss is F = L_0 + gamma mu logsumexp(L / mu), by hand (not the surrogate's value)
    f_value = losses["fused"] + gamma(1) * mu * float(torch.log(torch.exp(uni / mu).sum()))
    surrogate = losses["fused"] + gamma(1) * float((pi * uni).sum())
    assert abs(f_value - surrogate) > 1e-3
    assert step_metric(trainer, "train/loss") == pytest.approx(f_value, rel=1e-5)


def test_mimo_refuses_a_non_positive_or_infinite_temperature_and_gamma_above_its_cap() -> None:
    for mu in (0.0, -0.5, float("inf"), float("nan")):
        expected = f"MIMO: mu={mu}; expected a finite mu > 0 (the smoothing temperature)"
        with pytest.raises(MMLearnError, match=f"^{re.escape(expected)}$"):
            build(MIMO, mu=mu)
    for gamma, cap in ((10.5, 10.0), (3.0, 2.5), (-0.1, 10.0)):
        message = (
            f"MIMO: gamma={gamma} with gamma_max={cap}; expected 0 <= gamma <= gamma_max "
            "(gamma_max caps the schedule, it would silently replace gamma)"
        )
        with pytest.raises(MMLearnError, match=f"^{re.escape(message)}$"):
            build(MIMO, gamma=gamma, gamma_max=cap)
    assert build(MIMO, gamma=2.5, gamma_max=2.5)[0].gamma_at(0) == 2.5  # at the cap is fine
    assert build(MIMO, gamma=0.0)[0].gamma_at(3) == 0.0


# ---- replay of the manual step ---------------------------------------------------------------
def apply(model: nn.Module, combined: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, params, _ in groups_of(model):
            start = 0
            for p in params:
                p -= LR * combined[name][start : start + p.numel()].view_as(p)
                start += p.numel()


def replay_manual(
    model: nn.Module,
    batches: Batches,
    update: Callable[[int, dict[str, Tensor]], dict[str, Tensor]],
    steps: int = 2,
) -> tuple[nn.Module, list[dict[str, Tensor]]]:
    """SGD on ``update(t, rows)``, the combined row of every group; returns the rows seen."""
    log = []
    for t in range(steps):
        x, y = batches[t % len(batches)]
        rows = rows_of(model, x, y)
        log.append(rows)
        apply(model, update(t, rows))
    return model, log


def test_the_manual_sum_with_clipping_is_the_clipped_summed_gradient() -> None:
    clip = 0.05
    model, data = build(MultiObjective, rule=Sum(), clip_grad_norm=clip)
    replayed_model = copy.deepcopy(model)
    batches = epoch_batches(data)
    train(model, data)
    for t in range(2):
        x, y = batches[t]
        rows = rows_of(replayed_model, x, y)
        total = torch.cat([r.sum(0) for r in rows.values()]).norm()
        assert total > 2 * clip  # the clip is active
        apply(replayed_model, {n: r.sum(0) * clip / (total + 1e-6) for n, r in rows.items()})
    assert_same_params(model, replayed_model)


def encoder_vectors(rows: Mapping[str, Tensor], modalities: list[str]) -> Tensor:
    """``[1 + M, P_encoders]``: each objective's gradient on ALL encoder parameters (zeros where
    it does not reach an encoder), fused first."""
    out = []
    for k in ["fused", *modalities]:
        parts = []
        for m in modalities:
            r = rows[f"encoder.{m}"]
            parts.append(r[0] if k == "fused" else r[1] if k == m else torch.zeros_like(r[0]))
        out.append(torch.cat(parts))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("kw", "scale", "normalize"),
    [({}, 1.0, False), ({"scale": 2.0, "normalize": True}, 2.0, True)],
    ids=["defaults", "scale-2-normalize"],
)
def test_mgda_takes_one_min_norm_point_over_all_objectives_on_the_encoders(
    kw: dict, scale: float, normalize: bool
) -> None:
    model, data = build(MultiObjective, rule=MGDA(**kw))  # scope="global" is the default
    replayed_model = copy.deepcopy(model)
    batches = epoch_batches(data)
    trainer = train(model, data)
    mods = list(model.modalities)
    solved: list[Tensor] = []

    def update(t: int, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        v = encoder_vectors(rows, mods)
        if normalize:  # weights from the unit-norm gradients, applied to the original ones
            v = v / v.norm(dim=1, keepdim=True)
        w = min_norm_point(v).float()
        solved.append(w)
        out = {}
        for i, m in enumerate(mods):
            r = rows[f"encoder.{m}"]
            out[f"encoder.{m}"] = scale * (w[0] * r[0] + w[1 + i] * r[1])
        return out | {n: scale * r[0] for n, r in rows.items() if not n.startswith("encoder.")}

    replayed_model, log = replay_manual(replayed_model, batches, update)
    assert_same_params(model, replayed_model)
    w, last = solved[-1], log[-1]
    assert float(w.min()) < 0.9 / len(w) or float(w.max()) > 1.1 / len(w)  # not uniform
    for i, m in enumerate(mods):
        r = last[f"encoder.{m}"]
        cos = float(F.cosine_similarity(r[0], r[1], dim=0))
        assert step_metric(trainer, f"train/cos/{m}") == pytest.approx(cos, abs=1e-5)
        # the same global weights for every encoder
        got = step_metric(trainer, f"train/weight/encoder.{m}/fused")
        assert got == pytest.approx(float(w[0]), abs=1e-5)
        assert step_metric(trainer, f"train/weight/encoder.{m}/{m}") == pytest.approx(
            float(w[1 + i]), abs=1e-5
        )


def test_mgda_per_group_takes_a_min_norm_point_in_each_encoder() -> None:
    model, data = build(MultiObjective, rule=MGDA(scope="per_group"))
    replayed_model = copy.deepcopy(model)
    batches = epoch_batches(data)
    trainer = train(model, data)
    weights: dict[str, Tensor] = {}

    def update(t: int, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, r in rows.items():
            if len(r) == 1:
                out[n] = r[0]
                continue
            weights[n] = min_norm_point(r).float()
            out[n] = weights[n] @ r
        return out

    replayed_model, log = replay_manual(replayed_model, batches, update)
    assert_same_params(model, replayed_model)
    # each encoder its own weights: not one global point
    fused = [float(weights[f"encoder.{m}"][0]) for m in model.modalities]
    assert max(fused) - min(fused) > 1e-3
    global_w = min_norm_point(encoder_vectors(log[-1], list(model.modalities)))
    assert max(abs(f - float(global_w[0])) for f in fused) > 1e-3
    for m in model.modalities:
        w = weights[f"encoder.{m}"]
        got = step_metric(trainer, f"train/weight/encoder.{m}/fused")
        assert got == pytest.approx(float(w[0]), abs=1e-5)
        assert step_metric(trainer, f"train/weight/encoder.{m}/{m}") == pytest.approx(
            float(w[1]), abs=1e-5
        )


replayed(MultiObjective)


# ---- BOGC: per-dimension weights from the variances (reference.ds_weights) -------------------
def calibrated(rows: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """``(n * sum_k w_k mu_k, w)``; a group of one objective keeps its gradient."""
    if len(rows) == 1:
        return rows[0], torch.ones(1, rows.shape[1])
    w = ds_weights(var.float())
    return len(rows) * (w * rows).sum(0), w


def assert_logged_bogc_weights(trainer: pl.Trainer, weights: Mapping[str, Tensor], mods) -> None:
    for m in mods:
        w = weights[f"encoder.{m}"]
        got = step_metric(trainer, f"train/weight/encoder.{m}/fused")
        assert got == pytest.approx(float(w[0].mean()), abs=1e-4)
        assert step_metric(trainer, f"train/weight/encoder.{m}/{m}") == pytest.approx(
            float(w[1].mean()), abs=1e-4
        )


def test_bogc_ema_moments_weight_by_the_exponentially_weighted_variance() -> None:
    beta = 0.7  # not 0.5, where beta and 1 - beta coincide
    model, data = build(BOGC, moments=EMAMoments(beta=beta))
    replayed_model = copy.deepcopy(model)
    batches = epoch_batches(data, epochs=2)
    trainer = train(model, data, steps=3)
    history: dict[str, list[Tensor]] = {}
    weights: dict[int, dict[str, Tensor]] = {}

    def update(t: int, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        weights[t] = {}
        for n, r in rows.items():
            history.setdefault(n, []).append(r)
            _, var, _ = ema_moments(history[n], beta)  # zero at the first step
            out[n], weights[t][n] = calibrated(r, var)
        return out

    replayed_model, _ = replay_manual(replayed_model, batches, update, steps=3)
    assert_same_params(model, replayed_model, atol=1e-5)
    assert_logged_bogc_weights(trainer, weights[2], model.modalities)
    # the first step is the plain sum (no variance yet) ...
    assert all(
        torch.equal(w, torch.full_like(w, 0.5)) for n, w in weights[0].items() if len(w) == 2
    )
    # ... the later ones are not (else this test proves little)
    assert max(float((w[0] - 0.5).abs().max()) for w in weights[2].values() if len(w) == 2) > 0.2


def test_bogc_microbatch_calibrates_with_the_chunks_sample_variance() -> None:
    model, data = build(BOGC, moments=Microbatch(n_chunks=4))
    replayed_model = copy.deepcopy(model)
    batches = epoch_batches(data)
    trainer = train(model, data)
    weights: dict[str, Tensor] = {}
    for t in range(2):
        x, y = batches[t]
        chunks = [
            rows_of(
                replayed_model,
                {m: v[c * 6 : (c + 1) * 6] for m, v in x.items()},
                y[c * 6 : (c + 1) * 6],
            )
            for c in range(4)
        ]
        combined = {}
        for name in chunks[0]:
            stack = torch.stack([c[name] for c in chunks])  # [chunks, n, P]
            mean, var = stack.mean(0), stack.var(0, unbiased=True)
            combined[name], weights[name] = calibrated(mean, var)
        apply(replayed_model, combined)
    assert_same_params(model, replayed_model, atol=1e-5)
    assert_logged_bogc_weights(trainer, weights, model.modalities)
    assert max(float((w[0] - 0.5).abs().max()) for w in weights.values() if len(w) == 2) > 0.2


def test_bogc_last_layer_variance_is_the_per_sample_gradient_variance() -> None:
    model, data = build(BOGC, moments=LastLayer())
    replayed_model = copy.deepcopy(model)
    batches = epoch_batches(data)
    trainer = train(model, data)

    def last_linear(k: str) -> nn.Linear:
        head = replayed_model.joint.head if k == "fused" else replayed_model.heads[k]
        return [m for m in head.modules() if isinstance(m, nn.Linear)][-1]

    weights: dict[str, Tensor] = {}
    for t in range(2):
        x, y = batches[t]
        var_k = {}
        for k in ["fused", *replayed_model.modalities]:
            layer = last_linear(k)
            per_sample = []
            for i in range(len(y)):
                z = late_outputs(replayed_model, {m: v[i : i + 1] for m, v in x.items()})[k]
                gw, gb = torch.autograd.grad(
                    F.cross_entropy(z, y[i : i + 1]), [layer.weight, layer.bias]
                )
                per_sample.append(torch.cat([gw, gb[:, None]], 1))
            var_k[k] = torch.stack(per_sample).var(0, unbiased=False).mean()
        rows = rows_of(replayed_model, x, y)
        combined = {}
        for name, _, objectives in groups_of(replayed_model):
            r = rows[name]
            var = torch.stack([var_k[k].expand(r.shape[1]) for k in objectives])
            combined[name], weights[name] = calibrated(r, var)
        apply(replayed_model, combined)
    assert_same_params(model, replayed_model, atol=1e-5)
    assert_logged_bogc_weights(trainer, weights, model.modalities)
    # one scalar variance per objective: milder than per-dimension weights, still not the sum
    assert max(float((w[0] - 0.5).abs().max()) for w in weights.values() if len(w) == 2) > 0.03


replayed(BOGC)


# ---- OGM-GE: the dominant encoder's gradient damped by 1 - tanh(alpha rho) --------------------
def ogm_block_logits(model: nn.Module, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``z_m = f_m W[:, block m]^T + b / M`` read off the linear fused head, by hand."""
    w, b = model.joint.head.weight, model.joint.head.bias
    mods = list(model.joint.encoders)
    out, start = {}, 0
    for m in mods:
        f = model.joint.encoders[m](x[m])
        out[m] = f @ w[:, start : start + f.shape[1]].T + b / len(mods)
        start += f.shape[1]
    return out


def ogm_coefficients(scores: list[float], alpha: float) -> list[float]:
    """The paper's eq. 10 for two modalities (audio = 0, visual = 1); the mean of the others
    in the ratio for more."""
    if len(scores) == 2:
        rho_v = scores[1] / scores[0]
        if rho_v > 1:
            return [1.0, 1 - math.tanh(alpha * rho_v)]
        return [1 - math.tanh(alpha / rho_v), 1.0]
    out = []
    for i, s in enumerate(scores):
        rho = s / (sum(scores[:i] + scores[i + 1 :]) / (len(scores) - 1))
        out.append(1 - math.tanh(alpha * rho) if rho > 1 else 1.0)
    return out


@pytest.mark.parametrize("modalities", [2, 3])
def test_ogm_damps_the_dominant_encoders_weight_gradients(modalities: int) -> None:
    alpha = 0.7
    data = {"num_modalities": modalities, "dim": [5, 4, 3][:modalities]}
    data |= {"intra": [1.5, 0.5, 0.2][:modalities]}
    model, dm = build(OGMGE, alpha=alpha, ge=False, data=data)
    replay = copy.deepcopy(model)
    batches = epoch_batches(dm)
    trainer = train(model, dm)
    seen: list[list[float]] = []
    for t in range(2):
        x, y = batches[t]
        replay.zero_grad()
        F.cross_entropy(joint_logits(replay.joint, x), y).backward()
        with torch.no_grad():
            blocks = ogm_block_logits(replay, x)
            scores = [
                float(F.softmax(z, -1)[torch.arange(len(y)), y].sum()) for z in blocks.values()
            ]
            k = ogm_coefficients(scores, alpha)
            seen.append(k)
            for i, enc in enumerate(replay.joint.encoders.values()):
                for p in enc.parameters():
                    if p.dim() >= 2:  # modulate="weights": every weight matrix, not the biases
                        p.grad *= k[i]
            for p in replay.parameters():
                p -= LR * p.grad
    assert_same_params(model, replay)
    assert any(min(k) < 0.9 for k in seen)  # the modulation acted
    for i, m in enumerate(model.modalities):
        assert step_metric(trainer, f"train/ogm/k/{m}") == pytest.approx(seen[-1][i], rel=1e-5)


def test_ogm_coefficient_and_which_encoder_for_both_orders_of_the_ratio() -> None:
    from mmlearn.strategies.ogm_ge import modulation_coefficients

    for scores, alpha in [
        ([3.0, 6.0], 0.8),
        ([6.0, 3.0], 0.8),
        ([4.0, 4.0], 0.1),
        ([1.0, 9.0], 2.0),
    ]:
        rho, k = modulation_coefficients(torch.tensor(scores), alpha)
        assert rho.tolist() == pytest.approx([scores[0] / scores[1], scores[1] / scores[0]])
        assert k.tolist() == pytest.approx(ogm_coefficients(scores, alpha), rel=1e-12)
    # by hand: visual twice as confident -> visual damped by 1 - tanh(1.6); audio kept
    assert modulation_coefficients(torch.tensor([3.0, 6.0]), 0.8)[1].tolist() == pytest.approx(
        [1.0, 1 - 0.9216685544064713]
    )
    # audio twice as confident -> audio damped; a tie damps audio (the released code's else)
    assert modulation_coefficients(torch.tensor([6.0, 3.0]), 0.8)[1].tolist() == pytest.approx(
        [1 - 0.9216685544064713, 1.0]
    )
    assert modulation_coefficients(torch.tensor([4.0, 4.0]), 0.1)[1].tolist() == pytest.approx(
        [1 - 0.09966799462495582, 1.0]
    )
    # three modalities: only those above the mean of the others
    _, k3 = modulation_coefficients(torch.tensor([2.0, 2.0, 8.0]), 0.5)
    assert k3.tolist() == pytest.approx([1.0, 1.0, 1 - math.tanh(2.0)])


def test_ogm_ge_noise_has_the_gradients_std_on_every_encoder_and_repeats_with_the_seed() -> None:
    def one_step(**kw: object) -> tuple[nn.Module, nn.Module]:
        model, dm = build(
            OGMGE,
            embed_dim=64,
            alpha=0.7,
            data={"num_modalities": 2, "dim": [40, 30], "intra": [1.5, 0.5]},
            **kw,
        )
        before = copy.deepcopy(model)
        train(model, dm, steps=1)
        return before, model

    before, plain = one_step(ge=False)
    _, noisy = one_step(ge=True, noise_seed=3)
    _, again = one_step(ge=True, noise_seed=3)
    _, other = one_step(ge=True, noise_seed=4)
    assert_same_params(noisy, again, atol=0)
    for m in plain.modalities:
        pairs = [
            (a, b, c, d)
            for a, b, c, d in zip(
                before.joint.encoders[m].parameters(),
                plain.joint.encoders[m].parameters(),
                noisy.joint.encoders[m].parameters(),
                other.joint.encoders[m].parameters(),
                strict=True,
            )
            if a.dim() >= 2
        ]
        assert pairs
        for a, b, c, d in pairs:
            # SGD: the noise is (plain update - noisy update) / LR; the damped gradient is the
            # plain run's, whose undamped std the noise has (the gradient before modulation)
            noise = ((b - c) / LR).detach()
            assert float((c - d).detach().abs().max()) > 0  # another seed, other noise
            assert noise.numel() >= 1000
            grad = ((a - b) / LR).detach()  # k * g
            assert float(noise.std()) > 0.5 * float(grad.std())  # noise is not small
            assert abs(float(noise.mean())) < 4 * float(noise.std()) / noise.numel() ** 0.5


def test_ogm_refuses_gradient_accumulation() -> None:
    # the modulation after each micro-batch would damp the gradient accumulated so far again
    model, data = build(OGMGE)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=2, logger=False)
    message = "OGMGE: trainer.accumulate_grad_batches=2 is not supported"
    with pytest.raises(MMLearnError, match=f"^{re.escape(message)}"):
        trainer.fit(model, datamodule=data)


replayed(OGMGE)


# ---- MMPareto: equal weights when the gradients agree, min-norm when they conflict ------------
def mmpareto_encoder_update(
    r: Tensor, sizes: list[int], gamma: float = 1.5, clip: float = 0.001
) -> tuple[Tensor, bool]:
    """The paper's loop on one encoder's rows ``[2, P]`` (fused, unimodal): (update, conflict)."""
    g0, g1 = r[0].double(), r[1].double()
    cos = float(g0 @ g1) / float(g0.norm() * g1.norm())
    if cos > 0:
        w0 = 0.5
    else:
        w0 = float((g1 @ g1 - g0 @ g1) / ((g0 - g1) @ (g0 - g1)))
        w0 = min(max(w0, clip), 1 - clip)
    new = 2 * (w0 * g0 + (1 - w0) * g1)
    out, start = [], 0
    for size in sizes:
        t = slice(start, start + size)
        diff = float((g0[t] + g1[t]).norm() / new[t].norm())
        out.append(new[t] * (diff * gamma if diff > 1 else gamma))
        start += size
    return torch.cat(out).float(), cos <= 0


def test_mmpareto_follows_the_papers_per_encoder_rule() -> None:
    model, data = build(MMPareto, gamma=1.5)
    replay = copy.deepcopy(model)
    batches = epoch_batches(data, epochs=2)
    train(model, data, steps=4)
    sizes = {n: [p.numel() for p in params] for n, params, _ in groups_of(replay)}
    conflicts: list[bool] = []

    def update(t: int, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, r in rows.items():
            if len(r) == 1:
                out[n] = r[0]  # heads: their own gradient, as under the summed loss
                continue
            out[n], conflict = mmpareto_encoder_update(r, sizes[n])
            conflicts.append(conflict)
        return out

    replay, _ = replay_manual(replay, batches, update, steps=4)
    assert_same_params(model, replay, atol=1e-5)
    assert len(conflicts) == 12 and 0 < sum(conflicts) < 12  # both branches were taken


def test_mmpareto_rule_by_hand_for_agreeing_and_conflicting_gradients() -> None:
    from mmlearn.gradients import MMParetoCombination

    rule = MMParetoCombination(gamma=1.5)
    agree = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    row, _ = rule(agree)
    torch.testing.assert_close(row, torch.tensor([3.0, 3.0, 1.5], dtype=torch.float64))
    # conflicting: w_0 = (|g1|^2 - g0.g1) / |g0 - g1|^2 = 3/5, new = 2 (0.6 g0 + 0.4 g1)
    conflict = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    new = torch.tensor([0.4, 0.8], dtype=torch.float64)
    row, _ = rule(conflict)  # one tensor: |sum| = 1 > |new| = sqrt(0.8): rescaled up to 1
    torch.testing.assert_close(row, 1.5 * new / 0.8**0.5)
    row, _ = rule(conflict, sizes=(1, 1))  # per tensor: [0] has |sum| = 0 (kept), [1] 1 / 0.8
    torch.testing.assert_close(row, torch.tensor([1.5 * 0.4, 1.5 * 1.0], dtype=torch.float64))
    # opposed gradients: the min-norm point is 0 up to rounding; rescaling that rounding to the
    # sum's norm would step in an arbitrary direction: those tensors get no step
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    row, _ = rule(torch.stack([g, -0.3 * g]), sizes=(600, 400))
    assert float(row.abs().max()) < 1e-5 * float(g.norm())
    row, _ = rule(torch.stack([g, -0.5 * g]).double())  # exact cancellation: 0, not NaN
    assert torch.equal(row, torch.zeros_like(row))
    # a nearly opposed pair: min-norm weight clipped to [0.001, 0.999]
    opposed = torch.tensor([[1.0, 0.0], [-1e-6, 0.0]], dtype=torch.float64)
    w = rule.simplex_weights(opposed)
    assert float(w[0]) == pytest.approx(0.001) and float(w[1]) == pytest.approx(0.999)


replayed(MMPareto)


# ---- MLA: alternating unimodal steps through one shared head --------------------------------
def mla_replay(
    model: nn.Module,
    batches: Batches,
    n_batches: int,
    modify: bool = True,
    clip: float | None = None,
) -> int:
    """The paper's loop: per batch, per modality, a step on its encoder and the shared head,
    the head's weight gradient projected by the recursive projector; returns the steps."""
    d = model.head.weight.shape[1]
    proj = torch.eye(d)
    count = 0
    for t in range(n_batches):
        x, y = batches[t]
        feats = {m: enc(x[m]) for m, enc in model.encoders.items()}
        for m, enc in model.encoders.items():
            params = [*enc.parameters(), model.head.weight, model.head.bias]
            loss = F.cross_entropy(model.head(feats[m]), y)
            grads = list(torch.autograd.grad(loss, params))
            if modify and count > 0:
                alpha = 0.1 ** (1 + t / len(batches))
                r = feats[m].detach().mean(0, keepdim=True)  # [1, D]
                k = proj @ r.T
                proj = proj - (k @ k.T) / (alpha + r @ k)
                proj = proj / torch.linalg.matrix_norm(proj)
                grads[-2] = grads[-2] @ proj.T
            if clip is not None:  # each step's gradient norm clipped (torch's clip_grad_norm_)
                total = float(torch.cat([g.flatten() for g in grads]).norm())
                grads = [g * min(1.0, clip / (total + 1e-6)) for g in grads]
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= LR * g
            count += 1
    return count


@pytest.mark.parametrize("modify", [True, False])
def test_mla_alternates_unimodal_steps_with_the_projected_head_gradient(modify: bool) -> None:
    model, data = build(MLA, gradient_modification=modify)
    replay = copy.deepcopy(model)
    batches = epoch_batches(data)
    m = len(model.modalities)
    train(model, data, steps=2 * m)  # M optimiser steps per batch
    assert mla_replay(replay, batches, 2, modify) == 2 * m
    assert_same_params(model, replay)
    if modify:  # the projection changed the head's update (the check has teeth)
        plain = copy.deepcopy(build(MLA)[0])
        mla_replay(plain, batches, 2, modify=False)
        assert float((plain.head.weight - replay.head.weight).abs().max()) > 1e-3


def test_mla_clips_each_unimodal_step() -> None:
    clip = 0.05
    model, data = build(MLA, clip_grad_norm=clip)
    replay = copy.deepcopy(model)
    batches = epoch_batches(data)
    train(model, data, steps=2 * len(model.modalities))
    mla_replay(replay, batches, 2, clip=clip)
    assert_same_params(model, replay)
    unclipped = copy.deepcopy(build(MLA)[0])
    mla_replay(unclipped, batches, 2)
    assert float((unclipped.head.weight - replay.head.weight).abs().max()) > 1e-3  # it clipped


def test_mla_fuses_by_entropy_and_drops_an_absent_modality() -> None:
    model, _ = build(MLA)
    sharp = torch.tensor([[4.0, 0.0, 0.0]])
    flat = torch.tensor([[0.1, 0.0, -0.1]])
    mid = torch.tensor([[1.0, 2.0, 0.0]])
    outputs = dict(zip(model.modalities, [sharp, flat, mid], strict=True))

    def entropy(z: Tensor) -> float:
        p = F.softmax(z, -1)
        return float(-(p * p.log()).sum())

    h = torch.tensor([entropy(z) for z in (sharp, flat, mid)])
    w = torch.exp(h.max() - h) / torch.exp(h.max() - h).sum()  # the paper's weights
    fused = w[0] * sharp + w[1] * flat + w[2] * mid
    got = model.predict_log_proba(outputs | {"fused": model.fuse(outputs)})
    torch.testing.assert_close(got, F.log_softmax(fused, -1))
    assert float(w[0]) > float(w[2]) > float(w[1])  # the sharpest modality weighs most
    present = {m: torch.tensor([m != model.modalities[0]]) for m in model.modalities}
    w2 = torch.exp(h[1:].max() - h[1:]) / torch.exp(h[1:].max() - h[1:]).sum()
    got = model.predict_log_proba(outputs | {"fused": model.fuse(outputs)}, present)
    torch.testing.assert_close(got, F.log_softmax(w2[0] * flat + w2[1] * mid, -1))
    # an absent modality's logits are left out, whatever they hold
    broken = outputs | {model.modalities[0]: torch.full_like(sharp, float("nan"))}
    torch.testing.assert_close(model.predict_log_proba(broken, present), got)


replayed(MLA)


def test_every_registered_strategy_has_a_replay() -> None:
    assert set(STRATEGIES.values()) <= REPLAYED, set(STRATEGIES.values()) - REPLAYED


# ---- evaluation ---------------------------------------------------------------------------------
def late_inference(model: nn.Module, x: Mapping[str, Tensor]):  # type: ignore[no-untyped-def]
    logits = late_outputs(model, x)  # the fused head decides; the heads are per-modality outputs
    return [logits["fused"]], {m: logits[m] for m in model.modalities}


#: each registered strategy's inference by hand: (the experts whose product predicts, the
#: per-modality logits measured as {stage}/acc/{m})
INFERENCE = {
    "InterOnly": lambda model, x: ([joint_logits(model.joint, x)], {}),
    "IntraOnly": lambda model, x: (
        list(expert_logits(model, x).values()),
        expert_logits(model, x),
    ),
    "I2M2": lambda model, x: (
        [joint_logits(model.joint, x), *expert_logits(model, x).values()],
        expert_logits(model, x),
    ),
    "MIMO": late_inference,
    "BOGC": late_inference,
    "MultiObjective": late_inference,
    "LateFusionHeads": late_inference,
    "MMPareto": late_inference,
    "OGMGE": lambda model, x: ([joint_logits(model.joint, x)], ogm_block_logits(model, x)),
    "MLA": lambda model, x: (
        [mla_fused(model, x)],
        {m: model.head(enc(x[m])) for m, enc in model.encoders.items()},
    ),
}


def mla_fused(model: nn.Module, x: Mapping[str, Tensor]) -> Tensor:
    """``sum_m w_m z_m``, ``w = softmax(-H(p_m))`` per sample, by hand."""
    z = [model.head(enc(x[m])) for m, enc in model.encoders.items()]
    h = torch.stack([-(F.softmax(v, -1) * F.log_softmax(v, -1)).sum(-1) for v in z])
    w = torch.exp(h.max(0).values - h)
    w = w / w.sum(0)
    return sum(w[i].unsqueeze(1) * v for i, v in enumerate(z))  # type: ignore[return-value]


def test_the_inference_table_covers_every_registered_strategy() -> None:
    assert set(INFERENCE) == set(STRATEGIES)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_test_metrics_and_predictions_follow_the_inference_rule(name: str) -> None:
    model, data = build(STRATEGIES[name])
    trainer = train(model, data, steps=4)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    test = data.splits["test"]
    x, y = test.inputs, test.target
    model.eval()
    with torch.no_grad():
        terms, per_modality = INFERENCE[name](model, x)
    s = sum(F.log_softmax(z, -1) for z in terms)
    log_probs = s - s.logsumexp(-1, keepdim=True)
    pred = log_probs.argmax(-1)
    assert metrics["test/acc"] == pytest.approx(float((pred == y).float().mean()), abs=1e-6)
    assert metrics["test/f1"] == pytest.approx(macro_f1(y.numpy(), pred.numpy(), K), abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(float(F.nll_loss(log_probs, y)), rel=1e-5)
    assert {k for k in metrics if k.startswith("test/acc/")} == {
        f"test/acc/{m}" for m in per_modality
    }
    for m, z in per_modality.items():
        acc_m = float((z.argmax(-1) == y).float().mean())
        assert metrics[f"test/acc/{m}"] == pytest.approx(acc_m, abs=1e-6)
    out = trainer.predict(model, datamodule=data)
    assert out is not None
    got = torch.cat([o["log_probs"] for o in out])  # type: ignore[index]
    torch.testing.assert_close(got, log_probs, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([o["pred"] for o in out]), pred)  # type: ignore[index]
    assert torch.equal(torch.cat([o["target"] for o in out]), y)  # type: ignore[index]


def test_mimo_weights_keep_float64_losses_in_float64() -> None:
    # pi's rounding error grows like eps * L / mu: at mu = 1e-3 float32 was 1e-5 off
    model = MIMO(
        input_shapes={"a": [4], "b": [3]}, num_classes=3, embed_dim=5, head_hidden=None, mu=1e-3
    ).double()
    t = torch.tensor([0.0, 1.0, 1.0012345678], dtype=torch.float64, requires_grad=True)
    model.total_loss({"fused": t[0], "a": t[1], "b": t[2]}).backward()
    pi = torch.softmax(t[1:].detach() / 1e-3, 0)
    torch.testing.assert_close(t.grad[1:], pi, rtol=1e-12, atol=0)
    assert abs(float(pi[0]) - 0.22538295397274366) < 1e-12
