"""MIMO, BOGC and MultiObjective: the manual step, moments, MIMO's gradient, precision, groups."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from mmlearn.batch import collate_multimodal
from mmlearn.data import SyntheticMultimodal
from mmlearn.data.base import SplitDataset
from mmlearn.errors import MMLearnError
from mmlearn.gradients import MGDA, Sum
from mmlearn.strategies import (
    BOGC,
    FUSED,
    MIMO,
    EMAMoments,
    LastLayer,
    LateFusionHeads,
    Microbatch,
    MultiObjective,
)
from mmlearn.strategies import step as jac
from mmlearn.strategies.moments import last_layer_moments
from mmlearn.strategies.multi_objective import refuse_float16

DATA = {
    "num_modalities": 3,
    "dim": [6, 5, 4],
    "num_classes": 3,
    "n_train": 128,
    "n_val": 32,
    "n_test": 32,
    "batch_size": 32,
    "intra": [1.0, 0.5, 0.2],
    "inter": 1.0,
}


def make(cls, **kw):
    torch.manual_seed(0)
    data = SyntheticMultimodal(**DATA)
    kw.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.3, momentum=0.9))
    hidden = None if cls.linear_fused_head else 16
    shapes = data.input_shapes
    model = cls(input_shapes=shapes, num_classes=3, embed_dim=8, head_hidden=hidden, **kw)
    return model, data


def fit(model, data, **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=trainer_kw.pop("max_steps", 5),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_kw,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def batch(data, n: int = 32):
    return collate_multimodal([SplitDataset(data.splits["train"])[i] for i in range(n)])


def test_sum_through_the_manual_step_equals_late_fusion_heads() -> None:
    auto, data = make(LateFusionHeads, fusion="lrtf")
    manual, _ = make(MultiObjective, fusion="lrtf", rule=Sum())
    assert auto.automatic_optimization and not manual.automatic_optimization
    # MultiObjective is always manual, also with its default rule (Sum) and moments (BatchRows)
    assert not make(MultiObjective)[0].automatic_optimization
    start = {k: v.clone() for k, v in auto.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in manual.state_dict().items())
    fit(auto, data)
    fit(manual, data)
    for k, v in auto.state_dict().items():
        assert torch.allclose(v, manual.state_dict()[k], atol=1e-6), k
    assert any(not torch.allclose(v, start[k]) for k, v in auto.state_dict().items())


def test_parameter_groups_cover_every_parameter_once() -> None:
    model, _ = make(BOGC, fusion="lrtf")
    groups = {g.name: g for g in model.groups}
    assert set(groups) == {
        "encoder.m0",
        "encoder.m1",
        "encoder.m2",
        "fused_head",
        "head.m0",
        "head.m1",
        "head.m2",
    }
    assert groups["encoder.m1"].objectives == [FUSED, "m1"]
    assert groups["fused_head"].objectives == [FUSED] and groups["head.m2"].objectives == ["m2"]
    assert sum(g.numel for g in model.groups) == sum(p.numel() for p in model.parameters())
    broken = model.groups[:-1]
    with pytest.raises(MMLearnError, match=r"trainable parameters in no group: \['heads.m2"):
        jac.validate_groups(broken, model, [FUSED, "m0", "m1", "m2"])


def test_mimo_gradient_is_that_of_the_penalised_objective() -> None:
    model, data = make(MIMO, mu=0.3, gamma=2.0)
    b = batch(data)
    losses = model.objectives(model(b.inputs), b.target)
    surrogate = model.total_loss(losses)
    uni = torch.stack([losses[m] for m in model.modalities])
    penalised = losses[FUSED] + 2.0 * 0.3 * torch.logsumexp(uni / 0.3, 0)
    assert torch.allclose(surrogate, penalised)  # its value is F (logged as train/loss)
    params = list(model.parameters())
    g1 = torch.autograd.grad(surrogate, params, retain_graph=True, allow_unused=True)
    g2 = torch.autograd.grad(penalised, params, allow_unused=True)
    for a, c in zip(g1, g2, strict=True):
        if a is not None or c is not None:
            assert torch.allclose(a, c, atol=1e-6)
    pi = model.modality_weights(losses)
    assert torch.allclose(pi, torch.softmax(uni.detach() / 0.3, 0))
    assert int(pi.argmax()) == int(uni.argmax())  # the worst modality gets the most weight
    assert model.gamma_at(0) == 2.0
    grow = MIMO(input_shapes={"a": [2]}, num_classes=2, gamma=1.0, gamma_power=0.5, gamma_max=3.0)
    assert grow.gamma_at(3) == pytest.approx(2.0) and grow.gamma_at(100) == 3.0


def test_bogc_microbatch_mean_is_the_full_batch_gradient() -> None:
    model, data = make(BOGC, moments=Microbatch(n_chunks=4))
    b = batch(data)
    _, _, stats = model.moments.local(model, b)
    mean, var = model.moments.finish(stats, 1)
    # without features: one backward per objective through the whole model (no boundary VJPs)
    full = jac.objective_rows(model.objectives(model(b.inputs), b.target), model.groups)
    assert set(mean) == set(full)
    for g in full:
        assert torch.allclose(mean[g], full[g], atol=1e-6), g
        assert var is not None and (var[g] >= 0).all()
    assert float(var["encoder.m0"].sum()) > 0


def test_precision_16_is_refused_and_bf16_trains() -> None:
    for bad in ("16-mixed", "16-true"):
        with pytest.raises(
            MMLearnError, match=rf"BOGC: trainer.precision='{bad}' is not supported"
        ):
            refuse_float16(bad, "BOGC")
    for ok in ("32-true", "bf16-mixed", "bf16-true"):
        refuse_float16(ok, "BOGC")
    model, data = make(BOGC, clip_grad_norm=1.0)
    trainer = fit(model, data, precision="bf16-mixed", max_steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_clip_grad_norm_bounds_the_written_gradient() -> None:
    model, data = make(MultiObjective, rule=Sum(), clip_grad_norm=0.01)
    fit(model, data, max_steps=1)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(norm) <= 0.01 + 1e-6


def test_diagnostics_are_logged() -> None:
    # the logged values themselves are checked against an independent computation in
    # tests/unit/test_strategy_steps.py; here: over a whole fit, BOGC calibrates and MIMO weights
    model, data = make(BOGC)
    metrics = fit(model, data).callback_metrics
    for m in ("m0", "m1", "m2"):
        w0 = float(metrics[f"train/weight/encoder.{m}/fused_epoch"])
        w1 = float(metrics[f"train/weight/encoder.{m}/{m}_epoch"])
        assert abs(w0 - 0.5) > 1e-3 and w0 != w1  # not the plain sum
        assert f"train/cos/{m}_epoch" in metrics
    model, data = make(MIMO)
    metrics = fit(model, data).callback_metrics
    pis = [float(metrics[f"train/pi/{m}_epoch"]) for m in ("m0", "m1", "m2")]
    # the weakest modality (m2: least intra signal) gets the largest weight
    assert pis[2] == max(pis) and pis[0] == min(pis)


def test_logits_keys_and_inference_rule() -> None:
    model, data = make(MIMO)
    out = model(batch(data, 4).inputs)
    assert set(out) == {FUSED, "m0", "m1", "m2"}
    assert torch.allclose(model.predict_log_proba(out), F.log_softmax(out[FUSED], -1))


def test_last_layer_moments_equal_explicit_per_sample_gradients() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    h, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    s1, s2 = last_layer_moments(h, layer(h), y)
    per_sample = []
    for i in range(7):
        loss = F.cross_entropy(layer(h[i : i + 1]), y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        per_sample.append(torch.cat([gw, gb[:, None]], 1))
    g = torch.stack(per_sample)
    assert torch.allclose(s1, g.sum(0), atol=1e-6) and torch.allclose(s2, (g * g).sum(0), atol=1e-6)


def test_bogc_last_layer_trains_with_one_variance_per_objective() -> None:
    model, data = make(BOGC, moments=LastLayer())
    _, _, stats = model.moments.local(model, batch(data))
    _, var = model.moments.finish(stats, 1)
    assert var is not None
    enc = var["encoder.m0"]
    assert enc.shape[0] == 2 and torch.equal(enc[0], enc[0, :1].expand_as(enc[0]))
    assert float(enc[0, 0]) != float(enc[1, 0]) and (enc >= 0).all()
    trainer = fit(model, data, max_steps=3)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_clip_grad_norm_is_the_one_clipping_option_also_for_automatic_strategies() -> None:
    model, data = make(LateFusionHeads, clip_grad_norm=0.01)
    fit(model, data, max_steps=1)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(norm) <= 0.01 + 1e-6
    model, data = make(LateFusionHeads)
    with pytest.raises(
        MMLearnError, match=r"gradient_clip_val=1.0: clip with model.clip_grad_norm"
    ):
        fit(model, data, max_steps=1, gradient_clip_val=1.0)
    # manual strategies: Lightning's own check (before any setup hook) refuses it first
    model, data = make(BOGC)
    with pytest.raises(Exception, match=r"gradient_clip_val=1.0"):
        fit(model, data, max_steps=1, gradient_clip_val=1.0)


class RecordingStep(jac.ManualStep):
    """The real step, recording the weights it used at every call."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, batch):  # type: ignore[no-untyped-def]
        report = super().__call__(model, batch)
        self.weights.append({k: v.clone() for k, v in report["weights"].items()})
        return report


@pytest.mark.parametrize("cls, kw", [(MultiObjective, {"rule": MGDA()}), (BOGC, {})])
def test_every_recomputes_the_weights_every_t_steps_and_reuses_them_between(cls, kw) -> None:
    model, data = make(cls, every=2, **kw)
    model.gradient_step = recorder = RecordingStep()
    fit(model, data, max_steps=4)
    w = recorder.weights
    assert len(w) == 4
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(w, w[1:], strict=False)]
    assert same == [True, False, True]  # steps 0 = 1, 1 != 2 (recomputed), 2 = 3
    assert model.cached_weights is not None


def test_ema_moments_live_in_float32_buffers_of_the_state_dict() -> None:
    model, data = make(BOGC, moments=EMAMoments(beta=0.5))
    encoders = [i for i, g in enumerate(model.groups) if len(g.objectives) > 1]
    keys = {f"moments.{s}_{i}" for i in encoders for s in ("mean", "m2")} | {"moments.weight"}
    assert keys <= set(model.state_dict())
    assert not any(k.startswith("moments.") for k in set(model.state_dict()) - keys)
    fit(model, data, max_steps=3, precision="bf16-mixed")
    state = model.state_dict()
    assert all(state[k].dtype == torch.float32 for k in keys)
    assert float(state["moments.weight"]) == pytest.approx(1 + 0.5 + 0.25)  # S_3
    assert float(state[f"moments.m2_{encoders[0]}"].abs().sum()) > 0
    fresh, _ = make(BOGC, moments=EMAMoments(beta=0.5))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.moments.weight, model.moments.weight)


def test_moments_that_cannot_serve_the_rule_or_the_model_are_refused() -> None:
    with pytest.raises(MMLearnError, match=r"rule BOGCCalibration needs a variance"):
        make(MultiObjective, rule=BOGC(input_shapes={"a": [2]}, num_classes=2).rule)
    image = {"encoders": {"m0": {"name": "resnet18", "width": 4, "blocks": [1]}}}
    torch.manual_seed(0)
    with pytest.raises(MMLearnError, match=r"Microbatch moments: joint.encoders.m0.*BatchNorm2d"):
        BOGC(
            input_shapes={"m0": [1, 8, 8], "m1": [3]}, num_classes=2, moments=Microbatch(), **image
        )
    # EMAMoments and LastLayer work with BatchNorm
    BOGC(input_shapes={"m0": [1, 8, 8], "m1": [3]}, num_classes=2, moments=LastLayer(), **image)
