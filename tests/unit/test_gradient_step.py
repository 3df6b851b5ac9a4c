"""The manual gradient step and the strategies built on it, against hand-computed values.

``mmlearn.strategies._jacobian`` (parameter groups, per-objective gradient rows, the reduction,
writing ``.grad``) is checked on hand-made modules whose gradients are known in closed form;
``MultiObjective``, ``BOGC`` and ``MIMO`` through a real Lightning ``Trainer`` on tiny models,
with every expected number computed here by plain torch autograd or by hand. Only the
several-process paths (the all-reduce itself) are left to ``tests/distributed``.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from helpers import fit_recording_warnings  # noqa: I001  (tests/helpers.py)
from mmlearn.batch import MultimodalBatch
from mmlearn.data import SyntheticMultimodal
from mmlearn.errors import MMLearnError
from mmlearn.gradients import MGDA, Rule, Sum
from mmlearn.strategies import BOGC, MIMO, MultiObjective
from mmlearn.strategies import _jacobian as jac
from mmlearn.strategies._jacobian import ParamGroup
from mmlearn.strategies.bogc import last_layer_moments
from mmlearn.strategies.multi_objective import refuse_float16
from reference import ds_weights, groups_of, late_outputs, rows_of

SHAPES = {"m0": [3], "m1": [2]}
K = 3
LR = 0.1
FLOAT16_HINT = (
    "is not supported: float16 would need a loss scaler per objective row; "
    "use '32-true' or 'bf16-mixed'"
)


def exactly(message: str) -> Any:
    """``pytest.raises`` for an :class:`MMLearnError` with exactly ``message``."""
    return pytest.raises(MMLearnError, match=f"^{re.escape(message)}$")


def build(cls: type, lr: float = LR, **kw: Any) -> Any:
    torch.manual_seed(0)
    return cls(
        input_shapes=SHAPES,
        num_classes=K,
        embed_dim=4,
        head_hidden=5,
        encoders={m: {"name": "mlp", "hidden": [6]} for m in SHAPES},
        optimizer=functools.partial(torch.optim.SGD, lr=lr),
        **kw,
    )


def make_data(n_train: int = 48, batch_size: int = 24) -> SyntheticMultimodal:
    return SyntheticMultimodal(
        num_modalities=2,
        dim=[3, 2],
        num_classes=K,
        n_train=n_train,
        n_val=4,
        n_test=4,
        batch_size=batch_size,
        intra=[1.0, 0.2],
        inter=1.0,
        seed=0,
    )


def trainer(**kw: Any) -> pl.Trainer:
    kw.setdefault("max_steps", 2)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kw,
    )


def first_batches(data: SyntheticMultimodal) -> list[MultimodalBatch]:
    """The first epoch's batches in the order the Trainer sees them."""
    loader = data.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(0)  # type: ignore[union-attr]
    return list(loader)


def sample_batch(n: int, multilabel: bool = False, seed: int = 1) -> MultimodalBatch:
    gen = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(n, *s, generator=gen) for m, s in SHAPES.items()}
    if multilabel:
        target = (torch.rand(n, K, generator=gen) > 0.5).long()
    else:
        target = torch.randint(0, K, (n,), generator=gen)
    return MultimodalBatch(inputs=inputs, target=target)


# ---- validate_groups ----------------------------------------------------------------------------
class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(3))
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)


def test_validate_groups_accepts_a_partition_and_leaves_frozen_parameters_out() -> None:
    net = Three()
    groups = [ParamGroup("g1", [net.a], ["x", "y"]), ParamGroup("g2", [net.b], ["y"])]
    jac.validate_groups(groups, net, ["x", "y"])  # `frozen` needs no group
    assert groups[0].numel == 2 and groups[1].numel == 3


def test_validate_groups_refuses_unknown_or_missing_objectives() -> None:
    net = Three()
    unknown = [ParamGroup("g1", [net.a, net.b], ["x", "z"])]
    with exactly("group 'g1': objectives ['x', 'z'] not in ['x', 'y']"):
        jac.validate_groups(unknown, net, ["x", "y"])
    empty = [ParamGroup("g1", [net.a], ["x"]), ParamGroup("g2", [net.b], [])]
    with exactly("group 'g2': objectives [] not in ['x', 'y']"):
        jac.validate_groups(empty, net, ["x", "y"])


def test_validate_groups_refuses_a_parameter_in_two_groups() -> None:
    net = Three()
    groups = [ParamGroup("g1", [net.a], ["x"]), ParamGroup("g2", [net.b, net.a], ["y"])]
    with exactly("a parameter is in groups 'g1' and 'g2'"):
        jac.validate_groups(groups, net, ["x", "y"])


def test_validate_groups_names_the_first_five_ungrouped_parameters_and_counts_all() -> None:
    net = nn.Module()
    for i in range(7):
        net.register_parameter(f"p{i}", nn.Parameter(torch.zeros(1)))
    net.register_parameter("frozen", nn.Parameter(torch.zeros(1), requires_grad=False))
    net.register_parameter("kept", nn.Parameter(torch.zeros(1)))
    with exactly("trainable parameters in no group: ['p0', 'p1', 'p2', 'p3', 'p4'] (7)"):
        jac.validate_groups([ParamGroup("g", [net.kept], ["x"])], net, ["x"])


# ---- objective_rows / reduce_rows / write_grads / combine ---------------------------------------
def test_objective_rows_are_closed_form_gradients_in_the_groups_objective_order() -> None:
    a = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    b = torch.tensor([2.0, -1.0, 4.0], requires_grad=True)
    c = torch.tensor([0.7], requires_grad=True)
    u = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    losses = {
        "x": (a * u).sum() + 0.5 * (b * b).sum() + 2.0 * c.sum(),  # grads u, b, 2
        "y": 1.5 * (a * a).sum(),  # grads 3a, and none on b (unused: a zero row)
    }
    groups = [ParamGroup("shared", [a, b], ["y", "x"]), ParamGroup("own", [c], ["x"])]
    rows = jac.objective_rows(losses, groups)
    assert list(rows) == ["shared", "own"]
    expected = torch.stack(
        [
            torch.cat([3 * a.detach().flatten(), torch.zeros(3)]),
            torch.cat([u.flatten(), b.detach()]),
        ]
    )
    torch.testing.assert_close(rows["shared"], expected)
    torch.testing.assert_close(rows["own"], torch.tensor([[2.0]]))
    assert a.grad is None and b.grad is None and c.grad is None  # no .grad accumulated


def test_all_reduce_and_reduce_rows_are_the_identity_on_one_process() -> None:
    assert jac.world_size() == 1
    flat = torch.tensor([1.0, -2.0, 3.0])
    for mean in (True, False):
        assert jac.all_reduce_(flat, mean=mean) is flat
        torch.testing.assert_close(flat, torch.tensor([1.0, -2.0, 3.0]))
    rows = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([[7.0]])}
    out = jac.reduce_rows(rows)
    assert list(out) == ["a", "b"]
    for name, r in rows.items():
        assert out[name].shape == r.shape
        torch.testing.assert_close(out[name], r)


def test_write_grads_keeps_the_parameter_dtype_and_overwrites_existing_grads_in_place() -> None:
    p64 = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    p32 = nn.Parameter(torch.zeros(3))
    q = nn.Parameter(torch.zeros(2))
    old = torch.full((3,), 9.0)
    p32.grad = old
    groups = [ParamGroup("g1", [p64, p32], ["x"]), ParamGroup("g2", [q], ["x"])]
    combined = {"g1": torch.arange(1.0, 8.0), "g2": torch.tensor([-1.0, -2.0])}
    jac.write_grads(groups, combined)
    assert p64.grad is not None and p64.grad.dtype == torch.float64
    torch.testing.assert_close(
        p64.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    )
    assert p32.grad is old  # written in place
    torch.testing.assert_close(old, torch.tensor([5.0, 6.0, 7.0]))
    assert q.grad is not None
    torch.testing.assert_close(q.grad, torch.tensor([-1.0, -2.0]))
    combined["g2"].zero_()  # a fresh gradient is a copy, not a view of the combined row
    torch.testing.assert_close(q.grad, torch.tensor([-1.0, -2.0]))


class Recorder(Rule):
    """Returns ``2 * rows[-1]`` and remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Tensor, Tensor | None]] = []

    def combine(
        self, rows: Tensor, group: str = "", var: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        self.calls.append((group, rows, var))
        return 2 * rows[-1], torch.full((rows.shape[0],), float(len(group)))


def test_combine_applies_the_rule_group_by_group() -> None:
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    groups = [ParamGroup("one", [p], ["x", "y"]), ParamGroup("three", [q], ["x"])]
    rows = {"one": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "three": torch.tensor([[5.0]])}
    var = {"one": torch.ones(2, 2), "three": torch.zeros(1, 1)}
    rule = Recorder()
    out, weights = jac.combine(rule, groups, rows, var)
    torch.testing.assert_close(out["one"], torch.tensor([6.0, 8.0]))
    torch.testing.assert_close(out["three"], torch.tensor([10.0]))
    torch.testing.assert_close(weights["one"], torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(weights["three"], torch.tensor([5.0]))
    assert [(g, v is var[g]) for g, _, v in rule.calls] == [("one", True), ("three", True)]
    jac.combine(rule, groups, rows)
    assert [v for _, _, v in rule.calls[2:]] == [None, None]


# ---- MultiObjective -----------------------------------------------------------------------------
def test_refuse_float16_names_the_strategy_the_precision_and_the_alternatives() -> None:
    for bad in ("16-mixed", "16-true", "16"):
        with exactly(f"MIMO: trainer.precision={bad!r} {FLOAT16_HINT}"):
            refuse_float16(bad, "MIMO")
    for ok in ("32-true", "32", "64-true", "bf16-mixed", "bf16-true"):
        refuse_float16(ok, "MIMO")


def test_setup_refuses_float16_only_under_manual_optimisation() -> None:
    for cls, kw in ((MultiObjective, {"rule": Sum()}), (BOGC, {})):
        model = build(cls, **kw)
        model.trainer = trainer(precision="16-true")
        with exactly(f"{cls.__name__}: trainer.precision='16-true' {FLOAT16_HINT}"):
            model.setup("fit")
        model.trainer = trainer(precision="bf16-true")
        model.setup("fit")
    automatic = build(MultiObjective)
    automatic.trainer = trainer(precision="16-true")
    automatic.setup("fit")  # Lightning's loss scaler covers automatic optimisation


def test_the_manual_step_checks_the_batch_as_a_training_batch() -> None:
    model = build(MultiObjective, rule=Sum())
    bad = MultimodalBatch(inputs={"m0": torch.zeros(2, 3)}, target=torch.zeros(2, dtype=torch.long))
    with exactly("train batch has modalities ['m0'], the model knows ['m0', 'm1']"):
        model.training_step(bad, 0)


def test_the_diagnostic_local_statistics_is_off_by_default() -> None:
    for cls in (MultiObjective, MIMO, BOGC):
        assert build(cls).local_statistics is False


@pytest.mark.parametrize("cls", [MultiObjective, MIMO])
def test_local_statistics_trains_like_the_synced_step_on_one_process(cls: type) -> None:
    kw: dict[str, Any] = {"rule": MGDA()} if cls is MultiObjective else {"mu": 0.2}
    synced, local = build(cls, **kw), build(cls, local_statistics=True, **kw)
    start = copy.deepcopy(synced.state_dict())
    trainer().fit(synced, datamodule=make_data())
    trainer().fit(local, datamodule=make_data())
    moved = False
    for name, value in synced.state_dict().items():
        torch.testing.assert_close(local.state_dict()[name], value, msg=name)
        moved |= not torch.allclose(value, start[name])
    assert moved


def test_manual_logging_of_losses_and_weights() -> None:
    model = build(MultiObjective, rule=Sum(), lr=0.0)
    replayed = copy.deepcopy(model)
    data = make_data(n_train=40)  # batches of 24 and 16
    batches = first_batches(data)
    fitted = trainer(max_epochs=1, max_steps=-1)
    caught = fit_recording_warnings(fitted, model, data)
    ambiguous = [w for w in caught if "infer the `batch_size`" in w]
    assert not ambiguous, ambiguous[0]
    metrics = fitted.callback_metrics
    last = batches[-1]
    with torch.no_grad():
        out = late_outputs(replayed, last.inputs)  # lr 0: the weights never move
        losses = {k: float(F.cross_entropy(z, last.target)) for k, z in out.items()}
    assert float(metrics["train/loss_step"]) == pytest.approx(sum(losses.values()), rel=1e-5)
    for k, v in losses.items():
        assert float(metrics[f"train/loss/{k}_step"]) == pytest.approx(v, rel=1e-5)
    rows = rows_of(replayed, last.inputs, last.target)
    for m in SHAPES:
        assert float(metrics[f"train/weight/encoder.{m}/fused_step"]) == 1.0
        assert float(metrics[f"train/weight/encoder.{m}/{m}_step"]) == 1.0
        r = rows[f"encoder.{m}"]
        cos = float(F.cosine_similarity(r[0], r[1], dim=0))
        assert float(metrics[f"train/cos/{m}_step"]) == pytest.approx(cos, abs=1e-5)
    # a group reached by one objective has no weights to report
    assert not [
        k for k in metrics if k.startswith(("train/weight/fused_head", "train/weight/head"))
    ]


def test_clip_grad_norm_is_a_norm_clip_whatever_the_trainer_asks() -> None:
    model = build(MultiObjective, rule=Sum(), clip_grad_norm=0.01)
    fitted = trainer(max_steps=1, gradient_clip_algorithm="value")
    with pytest.raises(MisconfigurationException, match="gradient_clip_algorithm='norm'"):
        fitted.fit(model, datamodule=make_data())


@pytest.mark.parametrize("rule", [Sum(), None], ids=["manual", "automatic"])
def test_the_lr_scheduler_steps_once_per_epoch(rule: Rule | None) -> None:
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = build(MultiObjective, rule=rule, lr_scheduler=scheduler)
    fitted = trainer(max_epochs=2, max_steps=-1)
    fitted.fit(model, datamodule=make_data(n_train=24))  # one step per epoch
    assert fitted.global_step == 2
    assert fitted.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.25)


# ---- rule state in checkpoints ------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*no pre-optimization state was saved")
@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint")
def test_a_resumed_bogc_continues_its_moving_moments(tmp_path: Path) -> None:
    straight = build(BOGC)
    every_two = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2, save_top_k=-1)
    trainer(max_steps=4, callbacks=[every_two], enable_checkpointing=True).fit(
        straight, datamodule=make_data(n_train=72)
    )
    path = tmp_path / "step=2.ckpt"  # mid-epoch (3 batches per epoch)
    saved = torch.load(path, weights_only=False)
    state = saved["rule_state"]["state"]
    assert sorted(state) == ["encoder.m0", "encoder.m1"]  # only groups with two objectives
    assert all(s == pytest.approx(1 + 0.9) for _, _, s in state.values())  # default beta 0.9

    resumed = build(BOGC)
    trainer(max_steps=4).fit(resumed, datamodule=make_data(n_train=72), ckpt_path=path)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6, msg=name)

    # without the moments the resumed run restarts its variance: the check above has teeth
    del saved["rule_state"]
    amnesic = tmp_path / "amnesic.ckpt"
    torch.save(saved, amnesic)
    restarted = build(BOGC)
    trainer(max_steps=4).fit(restarted, datamodule=make_data(n_train=72), ckpt_path=amnesic)
    pairs = zip(straight.parameters(), restarted.parameters(), strict=True)
    gap = max(float((a - b).detach().abs().max()) for a, b in pairs)
    assert gap > 1e-4


def test_checkpoint_hooks_without_rule_state() -> None:
    for model in (build(MultiObjective, rule=Sum()), build(MultiObjective)):
        checkpoint: dict[str, Any] = {}
        model.on_save_checkpoint(checkpoint)  # no rule, or a rule without state: nothing saved
        assert checkpoint == {}
    build(MultiObjective).on_load_checkpoint({"rule_state": {"state": {}}})  # no rule: ignored
    bogc = build(BOGC)
    bogc.rule.state = {"encoder.m0": (torch.ones(2, 3), torch.ones(2, 3), 1.0)}
    bogc.on_load_checkpoint({})  # an older checkpoint without moments keeps the current ones
    assert list(bogc.rule.state) == ["encoder.m0"]
    bogc.on_load_checkpoint({"rule_state": {"state": {}}})
    assert bogc.rule.state == {}


# ---- BOGC ---------------------------------------------------------------------------------------
def test_bogc_validates_its_options() -> None:
    with exactly("BOGC: variance='exact'; expected one of ['ema', 'microbatch', 'last_layer']"):
        build(BOGC, variance="exact")
    with exactly("BOGC: n_chunks=1; the microbatch variance needs >= 2"):
        build(BOGC, variance="microbatch", n_chunks=1)
    assert build(BOGC, variance="microbatch", n_chunks=2).n_chunks == 2
    for variance in ("ema", "last_layer"):  # n_chunks only matters to the microbatch estimator
        assert build(BOGC, variance=variance, n_chunks=1).variance == variance


def test_bogc_passes_eps_and_e_max_to_its_rule() -> None:
    rows = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]], dtype=torch.float64)
    var = torch.tensor([[0.0, 1.0, 4.0], [2.0, 0.5, 4.0]], dtype=torch.float64)
    model = build(BOGC, eps=0.5, e_max=1.2)
    out, w = model.rule.combine(rows, "g", var)
    expected = ds_weights(var, 0.5, 1.2)
    assert float(expected.max()) < 0.8  # the cap at 1.2 binds (uncapped e_00 would be ~2.2)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out, 2 * (expected * rows).sum(0), rtol=1e-12, atol=0)


def test_bogc_default_evidence_cap_is_1e3() -> None:
    # one near-certain dimension among 3000 entries: its evidence ~3000 is capped at 1000
    rows = torch.ones(2, 1500, dtype=torch.float64)
    var = torch.ones(2, 1500, dtype=torch.float64)
    var[0, 0] = 0.0
    _, w = build(BOGC).rule.combine(rows, "g", var)
    lam = 1.0 / (var + 1e-8)
    e1 = float(lam[1, 0] / lam.mean())
    assert float(lam[0, 0] / lam.mean()) > 2000
    assert float(w[0, 0]) == pytest.approx((1000 + 0.5) / (1000 + e1 + 1), rel=1e-12)
    assert float(w[1, 0]) == pytest.approx((e1 + 0.5) / (1000 + e1 + 1), rel=1e-12)


def test_bogc_microbatch_uses_four_chunks_by_default() -> None:
    model = build(BOGC, variance="microbatch")
    b = sample_batch(8)
    outputs, losses, mean, var = model.gradient_statistics(b)
    chunks = [
        rows_of(
            model, {m: x[c * 2 : (c + 1) * 2] for m, x in b.inputs.items()}, b.target[c * 2 :][:2]
        )
        for c in range(4)
    ]
    assert var is not None
    for name in chunks[0]:
        stack = torch.stack([c[name] for c in chunks])
        torch.testing.assert_close(mean[name], stack.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(var[name], stack.var(0, unbiased=True), atol=1e-7, rtol=1e-4)
    with torch.no_grad():
        full = late_outputs(model, b.inputs)
    for k, z in full.items():  # the chunks' outputs, in order, and the mean of their losses
        torch.testing.assert_close(outputs[k], z)
        chunk_losses = [
            F.cross_entropy(z[c * 2 : (c + 1) * 2], b.target[c * 2 :][:2]) for c in range(4)
        ]
        torch.testing.assert_close(losses[k], torch.stack(chunk_losses).mean())
        assert not losses[k].requires_grad


def test_bogc_microbatch_refuses_a_batch_it_cannot_split() -> None:
    model = build(BOGC, variance="microbatch", n_chunks=4)
    with exactly("BOGC: n_chunks=4 does not split 1 rank(s) x batch 10 into equal chunks"):
        model.gradient_statistics(sample_batch(10))


def per_sample_last_layer(h: Tensor, layer: nn.Linear, target: Tensor, multilabel: bool) -> Tensor:
    """``[N, K, d+1]``: each sample's gradient of its own loss on ``[W, b]``, by autograd."""
    grads = []
    for i in range(len(h)):
        z = layer(h[i : i + 1])
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(z, target[i : i + 1].to(z.dtype))
        else:
            loss = F.cross_entropy(z, target[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        grads.append(torch.cat([gw, gb[:, None]], 1))
    return torch.stack(grads)


@pytest.mark.parametrize("multilabel", [False, True], ids=["single-label", "multi-label"])
def test_last_layer_moments_are_sums_of_per_sample_gradients(multilabel: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, K)
    h = torch.randn(7, 5)  # N = 7 samples, K = 3 classes: N != K
    if multilabel:
        y = torch.tensor(
            [[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 0]]
        )
        s1, s2 = last_layer_moments(h, layer(h), y, multilabel=True)
    else:
        y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
        s1, s2 = last_layer_moments(h, layer(h), y)  # single-label is the default
    g = per_sample_last_layer(h, layer, y, multilabel)
    torch.testing.assert_close(s1, g.sum(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s2, (g * g).sum(0), atol=1e-7, rtol=1e-5)


def test_last_layer_moments_of_a_double_precision_layer_are_float32() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, K).double()
    h, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([2, 0, 1, 1, 0, 2])
    s1, s2 = last_layer_moments(h, layer(h), y)
    g = per_sample_last_layer(h, layer, y, multilabel=False).float()
    assert s1.dtype == s2.dtype == torch.float32
    torch.testing.assert_close(s1, g.sum(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s2, (g * g).sum(0), atol=1e-7, rtol=1e-5)


def test_bogc_last_layer_variance_of_a_multilabel_model() -> None:
    model = build(BOGC, variance="last_layer", multilabel=True)
    b = sample_batch(6, multilabel=True)
    _, _, _, var = model.gradient_statistics(b)
    assert var is not None
    var_k = {}
    for k in ("fused", *SHAPES):
        head = model.joint.head if k == "fused" else model.heads[k]
        layer = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        grads = []
        for i in range(b.size):
            z = late_outputs(model, {m: x[i : i + 1] for m, x in b.inputs.items()})[k]
            loss = F.binary_cross_entropy_with_logits(z, b.target[i : i + 1].float())
            gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
            grads.append(torch.cat([gw, gb[:, None]], 1))
        var_k[k] = torch.stack(grads).var(0, unbiased=False).mean()
    for name, params, objectives in groups_of(model):
        size = sum(p.numel() for p in params)
        expected = torch.stack([var_k[k].expand(size) for k in objectives])
        torch.testing.assert_close(var[name], expected, atol=1e-9, rtol=1e-4)


# ---- MIMO ---------------------------------------------------------------------------------------
def test_mimo_defaults() -> None:
    model = build(MIMO)
    assert [model.gamma_at(t) for t in (0, 1, 7, 1000)] == [1.0] * 4  # gamma 1, power 0
    assert build(MIMO, gamma=50.0).gamma_at(0) == 10.0  # capped at gamma_max 10
    losses = {"fused": torch.tensor(0.3), "m0": torch.tensor(0.2), "m1": torch.tensor(0.9)}
    e0, e1 = torch.exp(torch.tensor(0.2 / 0.5)), torch.exp(torch.tensor(0.9 / 0.5))  # mu 0.5
    torch.testing.assert_close(model.modality_weights(losses), torch.stack([e0, e1]) / (e0 + e1))


def test_mimo_gamma_schedule() -> None:
    model = build(MIMO, gamma=0.5, gamma_power=1.0, gamma_max=2.0)
    assert [model.gamma_at(t) for t in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    root = build(MIMO, gamma=2.0, gamma_power=0.5, gamma_max=100.0)
    assert root.gamma_at(3) == pytest.approx(4.0)


def test_mimo_surrogate_keeps_the_losses_dtype() -> None:
    model = build(MIMO, mu=0.5, gamma=2.0)
    raw = {"fused": 0.75, "m0": 0.5, "m1": 1.25}
    losses = {k: torch.tensor(v, dtype=torch.bfloat16, requires_grad=True) for k, v in raw.items()}
    surrogate = model.total_loss(losses)
    assert surrogate.dtype == torch.bfloat16
    pi = torch.softmax(torch.tensor([0.5, 1.25]) / 0.5, 0)
    expected = 0.75 + 2.0 * float(pi[0] * 0.5 + pi[1] * 1.25)
    assert float(surrogate.detach()) == pytest.approx(expected, rel=1e-2)
    grads = torch.autograd.grad(surrogate, [losses["m0"], losses["m1"]])
    assert [float(g) for g in grads] == pytest.approx(
        [2 * float(pi[0]), 2 * float(pi[1])], rel=1e-2
    )


def test_mimo_logs_per_step_scalars_whose_epoch_value_is_the_plain_mean() -> None:
    mu = 0.05
    model = build(MIMO, lr=0.0, mu=mu, gamma=0.5, gamma_power=1.0, gamma_max=5.0)
    replayed = copy.deepcopy(model)
    data = make_data(n_train=40)  # batches of 24 and 16: a size-weighted mean would differ
    batches = first_batches(data)
    fitted = trainer(max_epochs=1, max_steps=-1)
    caught = fit_recording_warnings(fitted, model, data)
    ambiguous = [w for w in caught if "infer the `batch_size`" in w]
    assert not ambiguous, ambiguous[0]
    metrics = fitted.callback_metrics
    assert [b.size for b in batches] == [24, 16]
    pis, losses = [], []
    with torch.no_grad():
        for b in batches:  # lr 0: every step sees the initial weights
            out = late_outputs(replayed, b.inputs)
            loss = {k: F.cross_entropy(z, b.target) for k, z in out.items()}
            pis.append(torch.softmax(torch.stack([loss[m] for m in SHAPES]) / mu, 0))
            losses.append(loss)
    for i, m in enumerate(SHAPES):
        plain = float(pis[0][i] + pis[1][i]) / 2
        weighted = float(24 * pis[0][i] + 16 * pis[1][i]) / 40
        assert abs(plain - weighted) > 1e-3
        assert float(metrics[f"train/pi/{m}_epoch"]) == pytest.approx(plain, abs=1e-6)
        assert float(metrics[f"train/pi/{m}_step"]) == pytest.approx(float(pis[1][i]), abs=1e-6)
    assert float(metrics["train/gamma_step"]) == 1.0  # gamma_at(1) = 0.5 * 2
    assert float(metrics["train/gamma_epoch"]) == pytest.approx(0.75)  # not (24*.5 + 16)/40
    for k, v in losses[1].items():
        assert float(metrics[f"train/loss/{k}_step"]) == pytest.approx(float(v), rel=1e-5)
