"""The manual gradient step and the strategies built on it, against hand-computed values.

``mmlearn.strategies.step`` (parameter groups, per-objective gradient rows through the encoder
features, the one-collective reduction, writing ``.grad``, applying a rule) is checked on
hand-made modules whose gradients are known in closed form and on the real ``LateFusionHeads``
model against one ``autograd.grad`` per objective and group (``tests/reference.py``); the moments
estimators of ``mmlearn.strategies.moments``, the options every strategy shares (clipping,
precision, schedulers, logging) and ``MultiObjective``'s ``every`` and checkpoints through a real
Lightning ``Trainer`` on tiny models, with every expected number computed here by plain torch
autograd or by hand. Only the several-process paths (the all-reduce itself) are left to
``tests/distributed``.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Mapping
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
from mmlearn.gradients import MGDA, RULES, Block, BOGCCalibration, Rule, Sum
from mmlearn.strategies import (
    BOGC,
    MIMO,
    MLA,
    STRATEGIES,
    BatchRows,
    EMAMoments,
    LastLayer,
    LateFusionHeads,
    Microbatch,
    MultiObjective,
    step,
)
from mmlearn.strategies.moments import last_layer_moments
from mmlearn.strategies.multi_objective import refuse_float16
from mmlearn.strategies.step import ManualStep, ParamGroup
from reference import (
    ema_moments,
    expert_logits,
    groups_of,
    late_outputs,
    min_norm_point,
    multilabel_ce,
    rows_of,
)

SHAPES = {"m0": [3], "m1": [2]}
SHAPES3 = {"m0": [3], "m1": [2], "m2": [4]}
K = 3
LR = 0.1
FLOAT16_HINT = (
    "is not supported: float16 would need a loss scaler per objective row; "
    "use '32-true' or 'bf16-mixed'"
)
#: the manual-optimisation strategies: MultiObjective and its presets, and MLA (M steps a batch)
MANUAL = [name for name, cls in STRATEGIES.items() if issubclass(cls, (MultiObjective, MLA))]


def exactly(message: str) -> Any:
    """``pytest.raises`` for an :class:`MMLearnError` with exactly ``message``."""
    return pytest.raises(MMLearnError, match=f"^{re.escape(message)}$")


def build(cls: type, lr: float = LR, shapes: Mapping[str, list[int]] = SHAPES, **kw: Any) -> Any:
    torch.manual_seed(0)
    return cls(
        input_shapes=dict(shapes),
        num_classes=K,
        embed_dim=4,
        head_hidden=None if cls.linear_fused_head else 5,
        encoders={m: {"name": "mlp", "hidden": [6]} for m in shapes},
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


def fit_one_epoch_unmoved(model: Any) -> tuple[Any, list[MultimodalBatch], dict[str, Any]]:
    """One epoch (batches of 24 and 16) of a model built with lr 0, refusing Lightning's batch-size
    guesses: ``(a copy of the initial model, the batches, the callback metrics)``."""
    replayed = copy.deepcopy(model)
    data = make_data(n_train=40)
    batches = first_batches(data)
    fitted = trainer(max_epochs=1, max_steps=-1)
    caught = fit_recording_warnings(fitted, model, data)
    ambiguous = [w for w in caught if "infer the `batch_size`" in w]
    assert not ambiguous, ambiguous[0]
    return replayed, batches, dict(fitted.callback_metrics)


def first_batches(data: SyntheticMultimodal) -> list[MultimodalBatch]:
    """The first epoch's batches in the order the Trainer sees them."""
    loader = data.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(0)  # type: ignore[union-attr]
    return list(loader)


def sample_batch(
    n: int, multilabel: bool = False, seed: int = 1, shapes: Mapping[str, list[int]] = SHAPES
) -> MultimodalBatch:
    gen = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(n, *s, generator=gen) for m, s in shapes.items()}
    if multilabel:
        target = (torch.rand(n, K, generator=gen) > 0.5).long()
    else:
        target = torch.randint(0, K, (n,), generator=gen)
    return MultimodalBatch(inputs=inputs, target=target)


def sgd(model: nn.Module, update: Mapping[str, Tensor]) -> None:
    """``p -= LR * update`` group by group (``tests/reference.py``'s groups, in their order)."""
    with torch.no_grad():
        for name, params, _ in groups_of(model):
            start = 0
            for p in params:
                p -= LR * update[name][start : start + p.numel()].view_as(p)
                start += p.numel()


def assert_same_params(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    pairs = list(zip(a.named_parameters(), b.parameters(), strict=True))
    assert pairs
    for (name, p), q in pairs:
        torch.testing.assert_close(q, p, atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def max_gap(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


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
    step.validate_groups(groups, net, ["x", "y"])  # `frozen` needs no group
    assert groups[0].numel == 2 and groups[1].numel == 3
    assert groups[0].boundary is None  # rows by a backward from each loss unless told


def test_validate_groups_refuses_unknown_or_missing_objectives() -> None:
    net = Three()
    unknown = [ParamGroup("g1", [net.a, net.b], ["x", "z"])]
    with exactly("group 'g1': objectives ['x', 'z'] not in ['x', 'y']"):
        step.validate_groups(unknown, net, ["x", "y"])
    empty = [ParamGroup("g1", [net.a], ["x"]), ParamGroup("g2", [net.b], [])]
    with exactly("group 'g2': objectives [] not in ['x', 'y']"):
        step.validate_groups(empty, net, ["x", "y"])


def test_validate_groups_refuses_a_parameter_in_two_groups() -> None:
    net = Three()
    groups = [ParamGroup("g1", [net.a], ["x"]), ParamGroup("g2", [net.b, net.a], ["y"])]
    with exactly("a parameter is in groups 'g1' and 'g2'"):
        step.validate_groups(groups, net, ["x", "y"])


def test_validate_groups_names_the_first_five_ungrouped_parameters_and_counts_all() -> None:
    net = nn.Module()
    for i in range(7):
        net.register_parameter(f"p{i}", nn.Parameter(torch.zeros(1)))
    net.register_parameter("frozen", nn.Parameter(torch.zeros(1), requires_grad=False))
    net.register_parameter("kept", nn.Parameter(torch.zeros(1)))
    with exactly("trainable parameters in no group: ['p0', 'p1', 'p2', 'p3', 'p4'] (7)"):
        step.validate_groups([ParamGroup("g", [net.kept], ["x"])], net, ["x"])


# ---- objective_rows -----------------------------------------------------------------------------
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
    rows = step.objective_rows(losses, groups)
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


def test_objective_rows_through_a_boundary_are_closed_form_vector_jacobian_products() -> None:
    # "encoder" f = theta * s (elementwise, s fixed), then x = <h, f> + <h, h>, y = |f|^2, and
    # z = 3 <h, h> reaches the encoder's group on paper but not its features: a zero row
    theta = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    unused = torch.tensor([4.0, 4.0], requires_grad=True)  # in the encoder, not in f
    h = torch.tensor([0.3, 2.0, -1.0], requires_grad=True)
    s = torch.tensor([2.0, -1.0, 3.0])
    f = theta * s
    losses = {"x": (h * f).sum() + (h * h).sum(), "y": (f * f).sum(), "z": 3 * (h * h).sum()}
    groups = [
        ParamGroup("enc", [theta, unused], ["x", "y", "z"], boundary="f"),
        ParamGroup("head", [h], ["x", "z"]),
    ]
    rows = step.objective_rows(losses, groups, {"f": f})
    fd, hd = f.detach(), h.detach()
    enc = torch.stack(
        [
            torch.cat([hd * s, torch.zeros(2)]),  # dx/dtheta = h * s
            torch.cat([2 * fd * s, torch.zeros(2)]),  # dy/dtheta = 2 f * s
            torch.zeros(5),
        ]
    )
    torch.testing.assert_close(rows["enc"], enc)
    torch.testing.assert_close(rows["head"], torch.stack([fd + 2 * hd, 6 * hd]))
    # without the features (or with a feature name not given) the same rows by backward passes
    for features in (None, {}, {"other": f}):
        again = step.objective_rows(losses, groups, features)
        torch.testing.assert_close(again["enc"], enc)
        torch.testing.assert_close(again["head"], rows["head"])
    assert theta.grad is None and h.grad is None


@pytest.mark.parametrize("shapes", [SHAPES, SHAPES3], ids=["2-modalities", "3-modalities"])
def test_objective_rows_of_late_fusion_heads_equal_autograd_per_objective(
    shapes: Mapping[str, list[int]],
) -> None:
    model = build(LateFusionHeads, shapes=shapes)
    b = sample_batch(10, shapes=shapes)
    expected = rows_of(model, b.inputs, b.target)
    outputs, losses, feats = model.objective_graph(b.inputs, b.target)
    assert list(feats) == list(shapes)  # the boundary of every encoder group
    groups = model.parameter_groups()
    assert [g.boundary for g in groups] == [*shapes, *[None] * (1 + len(shapes))]
    fast = step.objective_rows(losses, groups, feats)
    slow = step.objective_rows(losses, groups)  # one backward per objective, no boundary
    assert list(fast) == [name for name, _, _ in groups_of(model)]
    for name, r in expected.items():
        assert r.abs().max() > 0, name  # nothing trivially zero
        torch.testing.assert_close(fast[name], r, atol=1e-7, rtol=1e-5, msg=name)
        torch.testing.assert_close(slow[name], r, atol=1e-7, rtol=1e-5, msg=name)
    assert all(p.grad is None for p in model.parameters())


class FirstOnly(nn.Module):
    """Concat fusion that ignores every modality but the first (zeros in its place)."""

    def __init__(self, modalities: list[str]) -> None:
        super().__init__()
        self.modalities = modalities

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        first = feats[self.modalities[0]]
        rest = [torch.zeros_like(feats[m]) for m in self.modalities[1:]]  # no graph to them
        return torch.cat([first, *rest], -1)


def test_objective_rows_for_encoders_an_objective_does_not_reach() -> None:
    model = build(LateFusionHeads)
    model.joint.fusion = FirstOnly(list(SHAPES))  # the fused loss never sees encoder m1
    unused = nn.Parameter(torch.ones(3))  # and encoder m0 holds a parameter no loss uses
    model.joint.encoders["m0"].register_parameter("unused", unused)
    groups = model.parameter_groups()
    b = sample_batch(8)
    expected = rows_of(model, b.inputs, b.target)
    _, losses, feats = model.objective_graph(b.inputs, b.target)
    rows = step.objective_rows(losses, groups, feats)
    for name, r in expected.items():
        torch.testing.assert_close(rows[name], r, atol=1e-7, rtol=1e-5, msg=name)
    assert torch.equal(rows["encoder.m1"][0], torch.zeros(groups[1].numel))
    assert rows["encoder.m1"][1].abs().max() > 0
    # `unused` is the encoder's own parameter: first in its parameters()
    assert groups[0].params[0] is unused
    assert torch.equal(rows["encoder.m0"][:, :3], torch.zeros(2, 3))
    assert rows["encoder.m0"][:, 3:].abs().max() > 0


# ---- the collectives on one process, write_grads, combine ---------------------------------------
def test_the_collectives_are_the_identity_on_one_process() -> None:
    assert step.world_size() == 1
    x = torch.tensor([1.0, -2.0, 3.0])
    assert step.sync_mean(x) is x
    stats = {"row:a": torch.arange(6.0).view(2, 3), "n": torch.tensor([7.0])}
    out = step.reduce_sum(stats)
    assert list(out) == ["row:a", "n"] and out is not stats
    assert all(out[k] is v for k, v in stats.items())
    torch.testing.assert_close(out["row:a"], torch.arange(6.0).view(2, 3))


def test_write_grads_keeps_the_parameter_dtype_and_replaces_existing_grads() -> None:
    p64 = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    p32 = nn.Parameter(torch.zeros(3))
    q = nn.Parameter(torch.zeros(2, 1))
    p32.grad = torch.full((3,), 9.0)  # an earlier step's gradient: replaced, not accumulated
    groups = [ParamGroup("g1", [p64, p32], ["x"]), ParamGroup("g2", [q], ["x"])]
    combined = {"g1": torch.arange(1.0, 8.0), "g2": torch.tensor([-1.0, -2.0])}
    step.write_grads(groups, combined)
    expected = {
        "p64": (p64, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)),
        "p32": (p32, torch.tensor([5.0, 6.0, 7.0])),
        "q": (q, torch.tensor([[-1.0], [-2.0]])),
    }
    for name, (p, value) in expected.items():
        assert p.grad is not None, name
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape, name
        torch.testing.assert_close(p.grad, value, rtol=0, atol=0, msg=name)
    step.write_grads(groups, {"g1": -torch.arange(1.0, 8.0), "g2": torch.zeros(2)})
    torch.testing.assert_close(p32.grad, -torch.tensor([5.0, 6.0, 7.0]), rtol=0, atol=0)
    torch.testing.assert_close(q.grad, torch.zeros(2, 1), rtol=0, atol=0)


class Recorder(Rule):
    """``combine``: ``2 * rows[-1]`` per block, weights ``len(objectives) + 10 * first``;
    ``apply``: ``weights[0] * rows[0]``. Remembers what it was given."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.applied: list[tuple[Tensor, Tensor]] = []

    def combine(self, blocks):  # type: ignore[no-untyped-def]
        self.blocks += list(blocks)
        return [
            (
                2 * b.rows[-1],
                torch.full((len(b.objectives),), len(b.objectives) + 10.0 * b.objectives[0]),
            )
            for b in blocks
        ]

    def apply(self, rows: Tensor, weights: Tensor) -> Tensor:
        self.applied.append((rows, weights))
        return weights[0] * rows[0]


def test_combine_hands_the_rule_one_block_per_group_aligned_by_objective() -> None:
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    groups = [ParamGroup("one", [p], ["z", "x"]), ParamGroup("two", [q], ["y"])]
    rows = {"one": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "two": torch.tensor([[5.0]])}
    var = {"one": torch.ones(2, 2), "two": torch.zeros(1, 1)}
    rule = Recorder()
    out, weights = step.combine(rule, groups, rows, var, ["x", "y", "z"])
    assert [
        (b.objectives, b.rows is rows[g], b.var is var[g])
        for b, g in zip(rule.blocks, rows, strict=True)
    ] == [
        ((2, 0), True, True),
        ((1,), True, True),
    ]
    torch.testing.assert_close(out["one"], torch.tensor([6.0, 8.0]))
    torch.testing.assert_close(out["two"], torch.tensor([10.0]))
    torch.testing.assert_close(weights["one"], torch.tensor([22.0, 22.0]))
    torch.testing.assert_close(weights["two"], torch.tensor([11.0]))
    assert not rule.applied
    step.combine(rule, groups, rows, None, ["x", "y", "z"])
    assert [b.var for b in rule.blocks[2:]] == [None, None]
    # with weights (every > 1) the rule only re-applies them, group by group
    given = {"one": torch.tensor([0.5, 9.0]), "two": torch.tensor([-2.0])}
    again, kept = step.combine(rule, groups, rows, var, ["x", "y", "z"], given)
    assert len(rule.blocks) == 4  # combine was not called
    torch.testing.assert_close(again["one"], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(again["two"], torch.tensor([-10.0]))
    assert [
        (r is rows[g], w is given[g]) for (r, w), g in zip(rule.applied, rows, strict=True)
    ] == [
        (True, True),
        (True, True),
    ]
    assert kept is not given and list(kept) == list(given)
    assert all(kept[g] is given[g] for g in given)


# ---- the step's hooks: the rank-local variants the distributed tests build ----------------------
class RankLocal(ManualStep):
    """Wrong on purpose under DDP: no sync of the statistics, combined rows averaged instead."""

    calls = 0

    def sync(self, stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        RankLocal.calls += 1
        return dict(stats)

    def finalize(self, combined: dict[str, Tensor]) -> dict[str, Tensor]:
        world = step.world_size()
        out = {}
        for k, v in combined.items():
            v = v.clone()
            if world > 1:  # pragma: no cover - one process here
                torch.distributed.all_reduce(v)
            out[k] = v / world
        return out


class LocalMIMO(MIMO):
    """MIMO with pi from this rank's losses (no ``sync_mean``)."""

    def modality_weights(self, losses: Mapping[str, Tensor]) -> Tensor:
        uni = torch.stack([losses[m].detach().float() for m in self.modalities])
        return torch.softmax(uni / self.mu, dim=0)


@pytest.mark.parametrize(
    ("make", "local"),
    [
        (lambda: build(MultiObjective, rule=MGDA()), None),
        (lambda: build(BOGC), None),
        (lambda: build(MIMO, mu=0.2), lambda: build(LocalMIMO, mu=0.2)),
    ],
    ids=["MGDA", "BOGC", "MIMO"],
)
def test_rank_local_variants_train_like_the_synced_step_on_one_process(make, local) -> None:
    synced = make()
    start = copy.deepcopy(synced.state_dict())
    if local is None:
        other = make()
        other.gradient_step = RankLocal()
    else:
        other = local()
    RankLocal.calls = 0
    trainer().fit(synced, datamodule=make_data())
    trainer().fit(other, datamodule=make_data())
    assert RankLocal.calls == (2 if local is None else 0)  # the hook is the one the step calls
    moved = False
    for name, value in synced.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], value, msg=name)
        moved |= not torch.allclose(value, start[name])
    assert moved


# ---- construction checks ------------------------------------------------------------------------
def test_a_rule_that_needs_a_variance_needs_moments_that_give_one() -> None:
    for rule_cls in RULES:
        if rule_cls.needs_variance:
            with exactly(
                f"MultiObjective: rule {rule_cls.__name__} needs a variance, moments BatchRows "
                "gives none; use EMAMoments, Microbatch or LastLayer"
            ):
                build(MultiObjective, rule=rule_cls(), moments=BatchRows())
        else:
            build(MultiObjective, rule=rule_cls(), moments=BatchRows())
    with exactly(
        "BOGC: rule BOGCCalibration needs a variance, moments BatchRows gives none; use "
        "EMAMoments, Microbatch or LastLayer"
    ):
        build(BOGC, moments=BatchRows())
    with exactly(
        "MultiObjective: rule BOGCCalibration needs a variance, moments BatchRows gives none; "
        "use EMAMoments, Microbatch or LastLayer"
    ):
        build(MultiObjective, rule=BOGCCalibration())  # the default moments give none
    for moments in (EMAMoments(), Microbatch(), LastLayer()):
        assert build(MultiObjective, rule=BOGCCalibration(), moments=moments).moments is moments
    with exactly("BOGC: its rule is BOGCCalibration; use MultiObjective for another"):
        build(BOGC, rule=Sum())


def test_every_below_one_is_refused() -> None:
    for bad in (0, -3):
        with exactly(f"MultiObjective: every={bad}; expected >= 1"):
            build(MultiObjective, every=bad)
        with exactly(f"BOGC: every={bad}; expected >= 1"):
            build(BOGC, every=bad)
    assert build(MultiObjective).every == 1
    assert build(MultiObjective, every=4).every == 4


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_clip_grad_norm_must_be_positive(name: str) -> None:
    for bad in (0, 0.0, -1.0):
        with exactly(f"{name}: clip_grad_norm={bad}; expected > 0 (or null)"):
            build(STRATEGIES[name], clip_grad_norm=bad)
    assert build(STRATEGIES[name]).clip_grad_norm is None
    assert build(STRATEGIES[name], clip_grad_norm=0.5).clip_grad_norm == 0.5


def test_moments_validate_their_arguments() -> None:
    with exactly("Microbatch: n_chunks=1; the variance needs >= 2"):
        Microbatch(n_chunks=1)
    assert Microbatch().n_chunks == 4 and Microbatch(n_chunks=2).n_chunks == 2
    for bad in (-0.1, 1.0, 1.5):
        with exactly(f"EMAMoments: beta={bad}; expected 0 <= beta < 1"):
            EMAMoments(beta=bad)
    assert EMAMoments().beta == 0.9 and EMAMoments(beta=0.0).beta == 0.0


# ---- precision ----------------------------------------------------------------------------------
def test_refuse_float16_names_the_strategy_the_precision_and_the_alternatives() -> None:
    for bad in ("16-mixed", "16-true", "16"):
        with exactly(f"MIMO: trainer.precision={bad!r} {FLOAT16_HINT}"):
            refuse_float16(bad, "MIMO")
    for ok in ("32-true", "32", "64-true", "bf16-mixed", "bf16-true"):
        refuse_float16(ok, "MIMO")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_setup_refuses_float16_only_under_manual_optimisation(name: str) -> None:
    cls = STRATEGIES[name]
    model = build(cls)
    assert model.automatic_optimization is (name not in MANUAL)
    model.trainer = trainer(precision="16-true")
    if name in MANUAL:
        with exactly(f"{name}: trainer.precision='16-true' {FLOAT16_HINT}"):
            model.setup("fit")
    else:
        model.setup("fit")  # Lightning's loss scaler covers automatic optimisation
    model.trainer = trainer(precision="bf16-true")
    model.setup("fit")


@pytest.mark.parametrize(
    "moments", [EMAMoments, LastLayer, Microbatch], ids=["EMAMoments", "LastLayer", "Microbatch"]
)
def test_bf16_mixed_trains_with_float32_moments(moments: Callable[[], Any]) -> None:
    model = build(BOGC, moments=moments())
    before = [p.detach().clone() for p in model.parameters()]
    trainer(precision="bf16-mixed").fit(model, datamodule=make_data())
    pairs = list(zip(before, model.parameters(), strict=True))
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for _, p in pairs)
    assert max(float((p.detach() - b).abs().max()) for b, p in pairs) > 0
    buffers = dict(model.moments.named_buffers())
    assert all(v.dtype == torch.float32 for v in buffers.values())
    if isinstance(model.moments, EMAMoments):
        assert sorted(buffers) == ["m2_0", "m2_1", "mean_0", "mean_1", "weight"]
        assert bool(torch.isfinite(buffers["m2_0"]).all()) and float(buffers["m2_0"].max()) > 0


def test_the_manual_step_checks_the_batch_as_a_training_batch() -> None:
    model = build(MultiObjective, rule=Sum())
    bad = MultimodalBatch(inputs={"m0": torch.zeros(2, 3)}, target=torch.zeros(2, dtype=torch.long))
    with exactly("train batch has modalities ['m0'], the model knows ['m0', 'm1']"):
        model.training_step(bad, 0)


# ---- clipping -----------------------------------------------------------------------------------
def clip_message(value: float) -> str:
    return (
        f"trainer.gradient_clip_val={value}: clip with model.clip_grad_norm={value} instead "
        "(the one clipping option of every strategy, automatic or manual)"
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_setup_refuses_trainer_gradient_clip_val_naming_model_clip_grad_norm(name: str) -> None:
    model = build(STRATEGIES[name])
    model.trainer = trainer(gradient_clip_val=0.5)
    with exactly(clip_message(0.5)):
        model.setup("fit")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_fit_refuses_trainer_gradient_clip_val_naming_model_clip_grad_norm(name: str) -> None:
    model = build(STRATEGIES[name])
    with exactly(clip_message(1.0)):
        trainer(gradient_clip_val=1.0).fit(model, datamodule=make_data())


@pytest.mark.parametrize("name", ["LateFusionHeads", "MultiObjective"])
def test_clip_grad_norm_is_a_norm_clip_whatever_the_trainer_asks(name: str) -> None:
    model = build(STRATEGIES[name], clip_grad_norm=0.01)
    fitted = trainer(max_steps=1, gradient_clip_algorithm="value")
    with pytest.raises(MisconfigurationException, match="gradient_clip_algorithm='norm'"):
        fitted.fit(model, datamodule=make_data())


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "MLA"])  # MLA: M steps a batch,
def test_an_active_clip_bounds_every_strategys_sgd_step_to_lr_times_the_clip(name: str) -> None:
    # each clipped (tests/unit/test_strategy_steps.py replays MLA with its clip)
    clip = 1e-3
    model = build(STRATEGIES[name], clip_grad_norm=clip)
    before = [p.detach().clone() for p in model.parameters()]
    trainer(max_steps=1).fit(model, datamodule=make_data())
    moved = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    )
    # SGD: the step is -LR * g with |g| clipped to `clip` (torch: clip / (|g| + 1e-6))
    assert float(moved.norm()) == pytest.approx(LR * clip, rel=1e-3)


def sum_of_objectives(model: nn.Module, x: Mapping[str, Tensor], y: Tensor) -> Tensor:
    return sum(F.cross_entropy(z, y) for z in late_outputs(model, x).values())  # type: ignore[return-value]


def fused_objective(model: nn.Module, x: Mapping[str, Tensor], y: Tensor) -> Tensor:
    j = model.joint
    return F.cross_entropy(j.head(j.fusion({m: e(x[m]) for m, e in j.encoders.items()})), y)


@pytest.mark.parametrize(
    ("name", "loss"),
    [
        ("LateFusionHeads", sum_of_objectives),  # automatic
        ("InterOnly", fused_objective),  # automatic, another model
        ("MultiObjective", sum_of_objectives),  # manual, after combining
    ],
)
def test_clip_grad_norm_is_the_by_hand_clipped_sgd_step(name: str, loss: Callable) -> None:
    clip = 0.05
    model = build(STRATEGIES[name], clip_grad_norm=clip)
    replayed = copy.deepcopy(model)
    data = make_data()
    batches = first_batches(data)
    trainer().fit(model, datamodule=data)
    params = list(replayed.parameters())
    for b in batches[:2]:
        grads = torch.autograd.grad(loss(replayed, b.inputs, b.target), params)
        norm = torch.cat([g.flatten() for g in grads]).norm()
        assert norm > 2 * clip  # the clip is active
        coef = min(1.0, clip / (float(norm) + 1e-6))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= LR * coef * g
    assert_same_params(model, replayed)


# ---- schedulers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_lr_scheduler_steps_once_per_epoch(name: str) -> None:
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = build(STRATEGIES[name], lr_scheduler=scheduler)
    fitted = trainer(max_epochs=2, max_steps=-1)
    fitted.fit(model, datamodule=make_data(n_train=24))  # one batch per epoch
    per_batch = len(model.modalities) if name == "MLA" else 1  # MLA: a step per modality
    assert fitted.global_step == 2 * per_batch
    assert fitted.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.25)


# ---- what every strategy logs -------------------------------------------------------------------
def product_nll(terms: list[Tensor], y: Tensor) -> Tensor:
    s = sum(F.log_softmax(z, -1) for z in terms)
    return F.nll_loss(s - s.logsumexp(-1, keepdim=True), y)  # type: ignore[operator]


def late_losses(model: nn.Module, x: Mapping[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    return {k: F.cross_entropy(z, y) for k, z in late_outputs(model, x).items()}


def joint_logits(model: nn.Module, x: Mapping[str, Tensor]) -> Tensor:
    j = model.joint
    return j.head(j.fusion({m: e(x[m]) for m, e in j.encoders.items()}))


#: each registered strategy's objectives, by hand from its sub-modules (docs/methods.md)
OBJECTIVES: dict[str, Callable[[nn.Module, Mapping[str, Tensor], Tensor], dict[str, Tensor]]] = {
    "InterOnly": lambda model, x, y: {"fused": F.cross_entropy(joint_logits(model, x), y)},
    "IntraOnly": lambda model, x, y: {
        "product": product_nll(list(expert_logits(model, x).values()), y)
    },
    "I2M2": lambda model, x, y: {
        "product": product_nll([joint_logits(model, x), *expert_logits(model, x).values()], y)
    },
    "MIMO": late_losses,
    "BOGC": late_losses,
    "MultiObjective": late_losses,
    "LateFusionHeads": late_losses,
    "MMPareto": late_losses,
    "OGMGE": lambda model, x, y: {"fused": F.cross_entropy(joint_logits(model, x), y)},
    "MLA": lambda model, x, y: {
        m: F.cross_entropy(model.head(e(x[m])), y) for m, e in model.encoders.items()
    },
}


def logged_total(name: str, losses: Mapping[str, Tensor]) -> float:
    """``train/loss``: the sum of the objectives; MIMO's F (defaults mu 0.5, gamma 1)."""
    if name == "MIMO":
        uni = torch.stack([losses[m] for m in SHAPES])
        return float(losses["fused"] + 0.5 * torch.logsumexp(uni / 0.5, 0))
    return float(sum(losses.values()))


def test_the_objectives_table_covers_every_registered_strategy() -> None:
    assert set(OBJECTIVES) == set(STRATEGIES)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_logs_its_loss_each_objective_and_its_diagnostics(name: str) -> None:
    cls = STRATEGIES[name]
    model = build(cls, lr=0.0)
    replayed, batches, metrics = fit_one_epoch_unmoved(model)  # batches of 24 and 16
    with torch.no_grad():  # lr 0: every step sees the initial weights
        per_batch = [OBJECTIVES[name](replayed, b.inputs, b.target) for b in batches]
    sizes = [b.size for b in batches]
    assert sizes == [24, 16]
    objectives = list(per_batch[0])
    diagnostic = ["loss", *(f"loss/{k}" for k in objectives)]
    if issubclass(cls, MultiObjective):
        diagnostic += [f"weight/encoder.{m}/{k}" for m in SHAPES for k in ("fused", m)]
        diagnostic += [f"cos/{m}" for m in SHAPES]
    if issubclass(cls, MIMO):
        diagnostic += [*(f"pi/{m}" for m in SHAPES), "gamma"]
    expected_keys = {f"train/{k}{s}" for k in diagnostic for s in ("", "_step", "_epoch")}
    prefixes = ("train/loss", "train/weight", "train/cos", "train/pi", "train/gamma")
    assert {k for k in metrics if k.startswith(prefixes)} == expected_keys
    totals = [logged_total(name, losses) for losses in per_batch]
    assert float(metrics["train/loss_step"]) == pytest.approx(totals[-1], rel=1e-5)
    epoch = sum(n * t for n, t in zip(sizes, totals, strict=True)) / sum(sizes)
    assert float(metrics["train/loss_epoch"]) == pytest.approx(epoch, rel=1e-5)
    for k in objectives:
        assert float(metrics[f"train/loss/{k}_step"]) == pytest.approx(
            float(per_batch[-1][k]), rel=1e-5
        )
        mean = sum(n * float(losses[k]) for n, losses in zip(sizes, per_batch, strict=True)) / sum(
            sizes
        )
        assert float(metrics[f"train/loss/{k}_epoch"]) == pytest.approx(mean, rel=1e-5)
    if issubclass(cls, MultiObjective):
        last = batches[-1]
        rows = rows_of(replayed, last.inputs, last.target)
        for m in SHAPES:
            r = rows[f"encoder.{m}"]
            cos = float(F.cosine_similarity(r[0], r[1], dim=0))
            assert float(metrics[f"train/cos/{m}_step"]) == pytest.approx(cos, abs=1e-5)
            if name == "MultiObjective":  # the default rule, Sum: unit weights
                assert float(metrics[f"train/weight/encoder.{m}/fused_step"]) == 1.0
                assert float(metrics[f"train/weight/encoder.{m}/{m}_step"]) == 1.0


# ---- every: weights recomputed every T steps ----------------------------------------------------
def global_mgda(rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per group ``(w_fused, w_m)`` of ONE min-norm point over the full encoder gradients."""
    mods = [n[len("encoder.") :] for n in rows if n.startswith("encoder.")]
    objectives = ["fused", *mods]
    full = []  # objective k's gradient on all encoder parameters, zero where it does not reach
    for k in objectives:
        full.append(
            torch.cat(
                [rows[f"encoder.{m}"][0 if k == "fused" else 1] * (k in ("fused", m)) for m in mods]
            )
        )
    w = min_norm_point(torch.stack(full)).float()
    out = {f"encoder.{m}": torch.stack([w[0], w[1 + i]]) for i, m in enumerate(mods)}
    return out | {n: torch.ones(1) for n in rows if not n.startswith("encoder.")}


def weighted(
    rows: Mapping[str, Tensor], weights: Mapping[str, Tensor], scale: float = 1.0
) -> dict[str, Tensor]:
    return {n: scale * (weights[n][:, None] * r).sum(0) for n, r in rows.items()}


class StepMetrics(pl.Callback):
    """What ``callback_metrics[key]`` holds after every training batch (None: not logged yet)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.seen = keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        got = trainer.callback_metrics
        self.seen.append({k: float(got[k]) if k in got else None for k in self.keys})


@pytest.mark.parametrize(
    "moments",
    [BatchRows, functools.partial(EMAMoments, beta=0.5)],
    ids=["BatchRows-no-rows-between", "EMAMoments-rows-every-step"],
)
def test_every_recomputes_the_weights_at_multiples_of_t_and_reuses_them_in_between(
    moments: Callable[[], Any],
) -> None:
    every, steps, scale = 2, 5, 2.0
    model = build(MultiObjective, rule=MGDA(scale=scale), moments=moments(), every=every)
    replayed = copy.deepcopy(model)
    data = make_data(n_train=120)  # 5 batches: one epoch
    batches = first_batches(data)
    keys = [f"train/cos/{m}_step" for m in SHAPES]
    keys += [f"train/weight/encoder.{m}/fused_step" for m in SHAPES]
    record = StepMetrics(keys)
    fitted = trainer(max_steps=steps, callbacks=[record])
    fitted.fit(model, datamodule=data)
    weights, fresh_gap = None, 0.0
    rows_every_step = not isinstance(model.moments, BatchRows)
    for t in range(steps):
        b = batches[t]
        rows = rows_of(replayed, b.inputs, b.target)
        fresh = global_mgda(rows)
        if t % every == 0:
            weights = fresh
        else:
            assert weights is not None
            gap = max(float((weights[n] - fresh[n]).abs().max()) for n in weights)
            fresh_gap = max(fresh_gap, gap)
        for m in SHAPES:
            logged = record.seen[t]
            w = float(weights[f"encoder.{m}"][0])
            assert logged[f"train/weight/encoder.{m}/fused_step"] == pytest.approx(w, abs=1e-5)
            r = rows[f"encoder.{m}"]
            cos = float(F.cosine_similarity(r[0], r[1], dim=0))
            if t % every == 0 or rows_every_step:
                assert logged[f"train/cos/{m}_step"] == pytest.approx(cos, abs=1e-5)
            else:  # a step that forms no rows logs no cosine: the last one stays
                assert logged[f"train/cos/{m}_step"] == record.seen[t - 1][f"train/cos/{m}_step"]
        sgd(replayed, weighted(rows, weights, scale))
    assert fresh_gap > 1e-3  # reusing is not recomputing here: the check has teeth
    assert_same_params(model, replayed, atol=2e-6)
    assert model.cached_weights is not None
    for n, w in weights.items():  # the last step (t = 4) recomputed them
        torch.testing.assert_close(model.cached_weights[n], w, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*no pre-optimization state was saved")
@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint")
def test_cached_weights_survive_a_checkpoint_round_trip(tmp_path: Path) -> None:
    def fresh() -> MultiObjective:
        return build(MultiObjective, rule=MGDA(), every=3)

    straight = fresh()
    first = copy.deepcopy(straight)
    data = make_data(n_train=72)  # 3 batches per epoch
    every_two = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2, save_top_k=-1)
    trainer(max_steps=5, callbacks=[every_two], enable_checkpointing=True).fit(
        straight, datamodule=data
    )
    path = tmp_path / "step=2.ckpt"  # steps 0 and 1 done: step 2 reuses step 0's weights
    saved = torch.load(path, weights_only=False)
    b0 = first_batches(data)[0]
    by_hand = global_mgda(rows_of(first, b0.inputs, b0.target))
    assert sorted(saved["cached_weights"]) == sorted(by_hand)
    for n, w in by_hand.items():
        torch.testing.assert_close(saved["cached_weights"][n], w, atol=1e-5, rtol=1e-4)

    resumed = fresh()
    trainer(max_steps=5).fit(resumed, datamodule=make_data(n_train=72), ckpt_path=path)
    assert_same_params(straight, resumed, atol=1e-7)

    # without the cached weights the resumed run recomputes at step 2: the check has teeth
    del saved["cached_weights"]
    amnesic = tmp_path / "amnesic.ckpt"
    torch.save(saved, amnesic)
    restarted = fresh()
    trainer(max_steps=5).fit(restarted, datamodule=make_data(n_train=72), ckpt_path=amnesic)
    assert max_gap(straight, restarted) > 1e-4


def test_checkpoint_hooks_with_and_without_cached_weights() -> None:
    model = build(MultiObjective)
    checkpoint: dict[str, Any] = {}
    model.on_save_checkpoint(checkpoint)  # nothing cached yet: nothing saved
    assert checkpoint == {}
    model.on_load_checkpoint({})  # an older checkpoint without them keeps None
    assert model.cached_weights is None
    model.cached_weights = {"encoder.m0": torch.tensor([0.25, 0.75])}
    model.on_save_checkpoint(checkpoint)
    assert list(checkpoint) == ["cached_weights"]
    torch.testing.assert_close(
        checkpoint["cached_weights"]["encoder.m0"], torch.tensor([0.25, 0.75])
    )
    other = build(MultiObjective)
    other.on_load_checkpoint({"cached_weights": {"head.m1": torch.tensor([2.0])}})
    assert other.cached_weights is not None and list(other.cached_weights) == ["head.m1"]


# ---- EMAMoments in checkpoints ------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*no pre-optimization state was saved")
@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint")
def test_a_resumed_bogc_continues_its_moving_moments(tmp_path: Path) -> None:
    straight = build(BOGC)
    replayed = copy.deepcopy(straight)
    data = make_data(n_train=72)  # 3 batches per epoch
    every_two = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2, save_top_k=-1)
    trainer(max_steps=4, callbacks=[every_two], enable_checkpointing=True).fit(
        straight, datamodule=data
    )
    path = tmp_path / "step=2.ckpt"  # mid-epoch
    saved = torch.load(path, weights_only=False)
    state = saved["state_dict"]
    # only the groups with two objectives (encoders, indices 0 and 1 of model.groups) have moments
    assert sorted(k for k in state if k.startswith("moments.")) == [
        "moments.m2_0",
        "moments.m2_1",
        "moments.mean_0",
        "moments.mean_1",
        "moments.weight",
    ]
    assert float(state["moments.weight"]) == pytest.approx(1 + 0.9)  # default beta 0.9
    # the moments by hand: step 0 is the plain sum (no variance yet), then step 1's rows
    batches = first_batches(data)
    history = []
    for t in range(2):
        rows = rows_of(replayed, batches[t].inputs, batches[t].target)
        history.append(rows)
        if t == 0:
            sgd(replayed, {n: r.sum(0) for n, r in rows.items()})
    for i, m in enumerate(SHAPES):
        mean, var, s = ema_moments([h[f"encoder.{m}"] for h in history], 0.9)
        assert state[f"moments.mean_{i}"].dtype == torch.float32
        torch.testing.assert_close(state[f"moments.mean_{i}"].double(), mean, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(state[f"moments.m2_{i}"].double(), var * s, atol=1e-9, rtol=1e-4)
        assert float(var.max()) > 0

    resumed = build(BOGC)
    trainer(max_steps=4).fit(resumed, datamodule=make_data(n_train=72), ckpt_path=path)
    assert_same_params(straight, resumed, atol=1e-7)

    # with the moments reset the resumed run restarts its variance: the check above has teeth
    for k in state:
        if k.startswith("moments."):
            state[k] = torch.zeros_like(state[k])
    amnesic = tmp_path / "amnesic.ckpt"
    torch.save(saved, amnesic)
    restarted = build(BOGC)
    trainer(max_steps=4).fit(restarted, datamodule=make_data(n_train=72), ckpt_path=amnesic)
    assert max_gap(straight, restarted) > 1e-4


# ---- Microbatch ---------------------------------------------------------------------------------
def test_microbatch_uses_four_chunks_by_default_and_their_sample_variance() -> None:
    model = build(BOGC, moments=Microbatch())
    b = sample_batch(8)
    outputs, losses, stats = model.moments.local(model, b)
    mean, var = model.moments.finish(model.gradient_step.sync(stats), step.world_size())
    chunks = [
        rows_of(
            model, {m: x[c * 2 : (c + 1) * 2] for m, x in b.inputs.items()}, b.target[c * 2 :][:2]
        )
        for c in range(4)
    ]
    assert var is not None and list(mean) == list(chunks[0])
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


def test_microbatch_refuses_a_batch_it_cannot_split() -> None:
    model = build(BOGC, moments=Microbatch(n_chunks=4))
    with exactly("Microbatch: n_chunks=4 does not split 1 rank(s) x batch 10 into equal chunks"):
        model.moments.local(model, sample_batch(10))
    three = build(MultiObjective, rule=Sum(), moments=Microbatch(n_chunks=3))
    with exactly("Microbatch: n_chunks=3 does not split 1 rank(s) x batch 8 into equal chunks"):
        three.moments.local(three, sample_batch(8))


def test_microbatch_refuses_a_model_with_batchnorm_naming_the_layer() -> None:
    shapes = {"img": [1, 8, 8], "v": [3]}
    encoders = {"img": {"name": "resnet18", "width": 2, "blocks": [1, 1]}}
    kw: dict[str, Any] = {"input_shapes": shapes, "num_classes": K, "embed_dim": 4}
    kw["encoders"] = encoders
    message = (
        "Microbatch moments: joint.encoders.img.features.1 (BatchNorm2d) normalises each chunk "
        "with the chunk's own statistics, so the chunk gradients are not samples of the batch "
        "gradient (and its running statistics would move once per chunk); use EMAMoments or "
        "LastLayer, or an encoder without BatchNorm"
    )
    with exactly(message):
        BOGC(moments=Microbatch(), **kw)
    with exactly(message):
        MultiObjective(rule=Sum(), moments=Microbatch(n_chunks=2), **kw)
    for moments in (EMAMoments(), LastLayer()):  # the other estimators take BatchNorm
        assert BOGC(moments=moments, **kw).moments is moments
    BOGC(moments=Microbatch(), **(kw | {"encoders": None}))  # the same model without BatchNorm


# ---- LastLayer ----------------------------------------------------------------------------------
def per_sample_last_layer(h: Tensor, layer: nn.Linear, target: Tensor, multilabel: bool) -> Tensor:
    """``[N, K, d+1]``: each sample's gradient of its own loss on ``[W, b]``, by autograd."""
    grads = []
    for i in range(len(h)):
        z = layer(h[i : i + 1])
        if multilabel:
            loss = multilabel_ce(z, target[i : i + 1])
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


@pytest.mark.parametrize("multilabel", [False, True], ids=["single-label", "multi-label"])
def test_last_layer_estimator_gives_each_objectives_per_sample_variance(multilabel: bool) -> None:
    model = build(BOGC, moments=LastLayer(), multilabel=multilabel)
    b = sample_batch(6, multilabel=multilabel)
    _, _, stats = model.moments.local(model, b)
    rows, var = model.moments.finish(model.gradient_step.sync(stats), step.world_size())
    assert var is not None
    loss = multilabel_ce if multilabel else F.cross_entropy
    var_k = {}
    for k in ("fused", *SHAPES):
        head = model.joint.head if k == "fused" else model.heads[k]
        layer = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        grads = []
        for i in range(b.size):
            z = late_outputs(model, {m: x[i : i + 1] for m, x in b.inputs.items()})[k]
            gw, gb = torch.autograd.grad(loss(z, b.target[i : i + 1]), [layer.weight, layer.bias])
            grads.append(torch.cat([gw, gb[:, None]], 1))
        var_k[k] = torch.stack(grads).var(0, unbiased=False).mean()
    assert len({round(float(v), 6) for v in var_k.values()}) == 3  # three different variances
    expected_rows = rows_of(model, b.inputs, b.target, loss)
    for name, params, objectives in groups_of(model):
        size = sum(p.numel() for p in params)
        expected = torch.stack([var_k[k].expand(size) for k in objectives])
        torch.testing.assert_close(var[name], expected, atol=1e-9, rtol=1e-4)
        torch.testing.assert_close(rows[name], expected_rows[name], atol=1e-7, rtol=1e-5)


# ---- MIMO ---------------------------------------------------------------------------------------
def test_mimo_defaults() -> None:
    model = build(MIMO)
    assert [model.gamma_at(t) for t in (0, 1, 7, 1000)] == [1.0] * 4  # gamma 1, power 0
    assert build(MIMO, gamma=10.0, gamma_power=1.0).gamma_at(5) == 10.0  # capped at gamma_max 10
    losses = {"fused": torch.tensor(0.3), "m0": torch.tensor(0.2), "m1": torch.tensor(0.9)}
    e0, e1 = torch.exp(torch.tensor(0.2 / 0.5)), torch.exp(torch.tensor(0.9 / 0.5))  # mu 0.5
    torch.testing.assert_close(model.modality_weights(losses), torch.stack([e0, e1]) / (e0 + e1))


def test_mimo_gamma_schedule() -> None:
    model = build(MIMO, gamma=0.5, gamma_power=1.0, gamma_max=2.0)
    assert [model.gamma_at(t) for t in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    root = build(MIMO, gamma=2.0, gamma_power=0.5, gamma_max=100.0)
    assert root.gamma_at(3) == pytest.approx(4.0)


def test_mimo_total_loss_is_f_with_the_surrogates_gradient_in_the_losses_dtype() -> None:
    model = build(MIMO, mu=0.5, gamma=2.0)
    raw = {"fused": 0.75, "m0": 0.5, "m1": 1.25}
    losses = {k: torch.tensor(v, dtype=torch.bfloat16, requires_grad=True) for k, v in raw.items()}
    total = model.total_loss(losses)
    assert total.dtype == torch.bfloat16
    lse = 0.5 * torch.logsumexp(torch.tensor([0.5, 1.25], dtype=torch.float64) / 0.5, 0)
    assert float(total.detach()) == pytest.approx(0.75 + 2.0 * float(lse), rel=1e-2)
    pi = torch.softmax(torch.tensor([0.5, 1.25]) / 0.5, 0)
    grads = torch.autograd.grad(total, [losses["fused"], losses["m0"], losses["m1"]])
    assert [float(g) for g in grads] == pytest.approx(
        [1.0, 2 * float(pi[0]), 2 * float(pi[1])], rel=1e-2
    )


def test_mimo_logs_per_step_scalars_whose_epoch_value_is_the_plain_mean() -> None:
    mu = 0.05
    model = build(MIMO, lr=0.0, mu=mu, gamma=0.5, gamma_power=1.0, gamma_max=5.0)
    # batches of 24 and 16: a size-weighted mean would differ
    replayed, batches, metrics = fit_one_epoch_unmoved(model)
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
        weighted_mean = float(24 * pis[0][i] + 16 * pis[1][i]) / 40
        assert abs(plain - weighted_mean) > 1e-3
        assert float(metrics[f"train/pi/{m}_epoch"]) == pytest.approx(plain, abs=1e-6)
        assert float(metrics[f"train/pi/{m}_step"]) == pytest.approx(float(pis[1][i]), abs=1e-6)
    assert float(metrics["train/gamma_step"]) == 1.0  # gamma_at(1) = 0.5 * 2
    assert float(metrics["train/gamma_epoch"]) == pytest.approx(0.75)  # not (24*.5 + 16)/40
    for k, v in losses[1].items():
        assert float(metrics[f"train/loss/{k}_step"]) == pytest.approx(float(v), rel=1e-5)
    uni = torch.stack([losses[1][m] for m in SHAPES])
    f_value = losses[1]["fused"] + 1.0 * mu * torch.logsumexp(uni / mu, 0)
    assert float(metrics["train/loss_step"]) == pytest.approx(float(f_value), rel=1e-5)
