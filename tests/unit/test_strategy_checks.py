"""The checks, defaults, logging and helpers every strategy shares, asserted value by value.

Constructor validation, ``setup`` / checkpoint / batch checks with their messages, the imputation
of missing modalities, the fused head, the multi-label branches, what a real ``Trainer`` run logs
(keys, values, progress bar), I2M2's expert loading and missing-modality rules. Expected numbers
come from plain torch operations on the models' weights, not from the code under test.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import fit_recording_warnings  # noqa: I001  (tests/helpers.py)
from helpers import quiet_trainer as trainer
from mmlearn.batch import MultimodalBatch
from mmlearn.data import SyntheticMultimodal
from mmlearn.encoders import build_encoder
from mmlearn.errors import MMLearnError
from mmlearn.gradients import MGDA, BOGCCalibration, Sum
from mmlearn.heads import all_present, make_head, product_of_experts
from mmlearn.metrics import key
from mmlearn.strategies import (
    BOGC,
    FUSED,
    I2M2,
    MLA,
    STRATEGIES,
    BatchRows,
    EMAMoments,
    InterOnly,
    IntraOnly,
    LastLayer,
    LateFusionHeads,
    MultiObjective,
)
from mmlearn.strategies.base import impute_missing
from reference import expert_logits

SHAPES = {"a": [4], "b": [3]}
K = 3
# lr 0: the weights stay put, so every step sees the same model
SGD0 = functools.partial(torch.optim.SGD, lr=0.0)


def exact(text: str) -> str:
    """A ``pytest.raises(match=...)`` pattern for exactly ``text``."""
    return "^" + re.escape(text) + "$"


# ---- a tiny in-memory DataModule -----------------------------------------------------------------
class Loader:
    """An iterable of ready batches (a list would be taken for a list of dataloaders)."""

    def __init__(self, batches: Sequence[MultimodalBatch]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Iterator[MultimodalBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TinyData(pl.LightningDataModule):
    """The same batches for every stage; the attributes ``setup`` compares with the model."""

    def __init__(
        self,
        batches: Sequence[MultimodalBatch] = (),
        input_shapes: dict[str, list[int]] | None = None,
        num_classes: int = K,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        self.batches = list(batches)
        self.input_shapes = dict(SHAPES if input_shapes is None else input_shapes)
        self.num_classes = num_classes
        self.multilabel = multilabel

    def train_dataloader(self) -> Loader:
        return Loader(self.batches)

    val_dataloader = test_dataloader = predict_dataloader = train_dataloader


class ShapesOnly(pl.LightningDataModule):
    """A DataModule that says nothing about classes or labels: ``setup`` checks shapes only."""

    def __init__(self, batches: Sequence[MultimodalBatch]) -> None:
        super().__init__()
        self.batches = list(batches)
        self.input_shapes = dict(SHAPES)

    def train_dataloader(self) -> Loader:
        return Loader(self.batches)

    val_dataloader = train_dataloader


def make_batches(
    sizes: Sequence[int], seed: int = 0, multilabel: bool = False, masks: bool = False
) -> list[MultimodalBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        inputs = {m: torch.randn(n, *s, generator=g) * 2 for m, s in SHAPES.items()}
        if multilabel:
            target = torch.randint(0, 2, (n, K), generator=g)
        else:
            target = torch.randint(0, K, (n,), generator=g)
        present = None
        if masks:  # sample 0 lacks 'a', sample 1 lacks 'b', the rest have both
            present = {m: torch.ones(n, dtype=torch.bool) for m in SHAPES}
            present["a"][0] = False
            present["b"][1] = False
        out.append(MultimodalBatch(inputs=inputs, target=target, present=present))
    return out


def cat(batches: Sequence[MultimodalBatch]) -> MultimodalBatch:
    """All batches as one (the epoch-level view of the data)."""
    inputs = {m: torch.cat([b.inputs[m] for b in batches]) for m in SHAPES}
    target = torch.cat([b.target for b in batches])
    masks = [b.present for b in batches]
    present = None
    if all(p is not None for p in masks):
        present = {m: torch.cat([p[m] for p in masks if p is not None]) for m in SHAPES}
    return MultimodalBatch(inputs=inputs, target=target, present=present)


def masked_product(logits: dict[str, Tensor], present: dict[str, Tensor] | None) -> Tensor:
    """``lsm(sum over present experts of lsm(z_k))``; absent experts contribute nothing."""
    s = torch.zeros_like(next(iter(logits.values())))
    for k, z in logits.items():
        keep = torch.ones(len(z), dtype=torch.bool)
        if present is not None and present.get(k) is not None:
            keep = present[k]
        s = s + torch.where(keep[:, None], F.log_softmax(z, -1), torch.zeros_like(z))
    return s - s.logsumexp(-1, keepdim=True)


# ---- heads ---------------------------------------------------------------------------------------
def test_make_head_is_linear_or_linear_relu_dropout_linear() -> None:
    torch.manual_seed(0)
    for hidden in (None, 0):
        lin = make_head(6, 3, hidden)
        assert type(lin) is nn.Linear and (lin.in_features, lin.out_features) == (6, 3)
    head = make_head(6, 3, 5, 0.25)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (6, 5)
    assert (head[3].in_features, head[3].out_features) == (5, 3)
    assert head[2].p == 0.25
    assert make_head(6, 3, 5)[2].p == 0.0  # no dropout unless asked
    # the forward pass is W2 relu(W1 x + b1) + b2 (dropout off in eval)
    head.eval()
    x = torch.randn(4, 6)
    h = (x @ head[0].weight.T + head[0].bias).clamp_min(0)
    assert (x @ head[0].weight.T + head[0].bias).min() < 0  # the ReLU has something to cut
    torch.testing.assert_close(head(x), h @ head[3].weight.T + head[3].bias)


def test_all_present_is_the_per_sample_and_of_the_masks() -> None:
    present = {
        "a": torch.tensor([True, False, True, True]),
        "b": torch.tensor([True, True, False, True]),
    }
    assert all_present(present).tolist() == [True, False, False, True]  # type: ignore[union-attr]
    assert all_present(None) is None
    assert all_present({}) is None


def test_product_of_experts_needs_an_expert() -> None:
    with pytest.raises(MMLearnError, match=exact("product_of_experts needs at least one expert")):
        product_of_experts({})


def test_product_of_experts_normalises_each_expert_before_adding() -> None:
    # expert 'a' has a huge shared offset per row: adding raw logits in float32 would round the
    # small logits of 'b' away; each expert's log-softmax removes the offset first
    za = torch.tensor([[1e7, 1e7 + 1.0], [-1e7, -1e7 + 2.0]])
    zb = torch.tensor([[0.5, 0.0], [1.0, 0.0]])
    expected = F.log_softmax(torch.tensor([[0.5, 1.0], [1.0, 2.0]]), -1)
    torch.testing.assert_close(product_of_experts({"a": za, "b": zb}), expected)


def test_log_probabilities_emit_no_warnings() -> None:
    z = {"a": torch.randn(3, K), "b": torch.randn(3, K)}
    model = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "implicit dimension choice" warning
        product_of_experts(z)
        model.log_proba(z["a"])


# ---- constructor validation and defaults ---------------------------------------------------------
def test_constructors_refuse_bad_arguments_with_clear_messages() -> None:
    for shapes in ({}, None):
        with pytest.raises(
            MMLearnError,
            match=exact(
                "InterOnly: input_shapes is empty; expected modality -> sample shape "
                "(the CLI links it from the DataModule's `input_shapes`)"
            ),
        ):
            InterOnly(input_shapes=shapes, num_classes=K)
    with pytest.raises(MMLearnError, match=exact("InterOnly: num_classes=None; expected >= 2")):
        InterOnly(input_shapes=SHAPES)
    with pytest.raises(MMLearnError, match=exact("IntraOnly: num_classes=1; expected >= 2")):
        IntraOnly(input_shapes=SHAPES, num_classes=1)
    assert InterOnly(input_shapes=SHAPES, num_classes=2, embed_dim=4).num_classes == 2
    with pytest.raises(
        MMLearnError,
        match=exact(
            "model.encoders names modalities ['c', 'z'] that the data does not have; "
            "the data's modalities are ['a', 'b']"
        ),
    ):
        InterOnly(input_shapes=SHAPES, num_classes=K, encoders={"z": {}, "a": {}, "c": {}})
    with pytest.raises(
        MMLearnError,
        match=exact("IntraOnly: mode='both'; expected one of ['joint', 'independent']"),
    ):
        IntraOnly(mode="both", input_shapes=SHAPES, num_classes=K)
    with pytest.raises(
        MMLearnError, match=exact("I2M2: missing_joint='zero'; expected ['impute', 'drop']")
    ):
        I2M2(missing_joint="zero", input_shapes=SHAPES, num_classes=K)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"embed_dim": 0},
            "InterOnly: model.embed_dim=0; expected an integer >= 1 "
            "(the feature size of every encoder)",
        ),
        (
            {"embed_dim": 2.5},
            "InterOnly: model.embed_dim=2.5; expected an integer >= 1 "
            "(the feature size of every encoder)",
        ),
        (
            {"fusion": "lrtf", "fusion_rank": 0},
            "InterOnly: model.fusion_rank=0; expected an integer >= 1 "
            "(the rank of the lrtf fusion)",
        ),
        (
            {"head_hidden": -1},
            "InterOnly: model.head_hidden=-1; expected an integer >= 0 "
            "(the fused head's hidden width; null or 0: a linear head)",
        ),
        ({"dropout": 1.0}, "InterOnly: model.dropout=1.0; expected a probability in [0, 1)"),
        ({"dropout": -0.1}, "InterOnly: model.dropout=-0.1; expected a probability in [0, 1)"),
        (
            {"dropout": float("nan")},
            "InterOnly: model.dropout=nan; expected a probability in [0, 1)",
        ),
        (
            {"fusion": "film"},
            "model.fusion: unknown fusion 'film'; valid fusions: ['concat', 'lrtf', 'sum']",
        ),
        (
            {"optimizer": functools.partial(torch.optim.Adam, lr=-1.0)},
            "InterOnly: model.optimizer.init_args.lr=-1.0: torch.optim.Adam expects lr >= 0 "
            "(Invalid learning rate: -1.0)",
        ),
        (
            {"optimizer": functools.partial(torch.optim.Adam, betas=(1.5, 0.9))},
            "InterOnly: model.optimizer.init_args.betas=1.5: torch.optim.Adam expects each beta "
            "in [0, 1) (Invalid beta parameter at index 0: 1.5)",
        ),
        (
            {"optimizer": functools.partial(torch.optim.SGD, lr=0.1, nesterov=True)},
            "InterOnly: model.optimizer: torch.optim.SGD refuses its options: Nesterov momentum "
            "requires a momentum and zero dampening",
        ),
        (
            {"encoders": {"a": {"name": "mlp", "hidden": [8, 0]}}},
            "model.encoders.a: mlp encoder: hidden=[8, 0]; expected a list of integers >= 1",
        ),
        (
            {"encoders": {"a": {"name": "mlp", "dropout": 1.5}}},
            "model.encoders.a: mlp encoder: dropout=1.5; expected a probability in [0, 1)",
        ),
    ],
    ids=lambda v: None if isinstance(v, dict) else v[:48],
)
def test_constructors_refuse_bad_sizes_probabilities_and_optimisers(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(MMLearnError, match=exact(message)):
        InterOnly(input_shapes=SHAPES, num_classes=K, **kwargs)  # type: ignore[arg-type]


def test_good_sizes_and_optimisers_are_kept() -> None:
    model = InterOnly(
        input_shapes=SHAPES,
        num_classes=K,
        embed_dim=1,
        fusion="lrtf",
        fusion_rank=1,
        head_hidden=0,
        dropout=0.0,
        optimizer=functools.partial(torch.optim.SGD, lr=0.0),
    )
    assert type(model.joint.head) is nn.Linear  # head_hidden 0: linear, as make_head does
    assert (model.embed_dim, model.fusion_rank, model.dropout) == (1, 1, 0.0)
    # IntraOnly builds no fusion, but a bad rank is still a bad value
    with pytest.raises(MMLearnError, match=r"model\.fusion_rank=-2"):
        IntraOnly(input_shapes=SHAPES, num_classes=K, fusion_rank=-2)
    # the dummy build leaves the real one alone: configure_optimizers still builds on the weights
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


@pytest.mark.parametrize(
    ("spec", "shape", "message"),
    [
        (
            {"name": "mlp", "hidden": 64},
            [4],
            "mlp encoder: hidden=64; expected a list of integers >= 1",
        ),
        (
            {"name": "cnn", "channels": [4, -1]},
            [1, 8, 8],
            "cnn encoder: channels=[4, -1]; expected a list of integers >= 1",
        ),
        (
            {"name": "cnn", "kernel_size": 0},
            [1, 8, 8],
            "cnn encoder: kernel_size=0; expected an integer >= 1",
        ),
        ({"name": "gru", "hidden": 0}, [5, 3], "gru encoder: hidden=0; expected an integer >= 1"),
        (
            {"name": "gru", "num_layers": 0},
            [5, 3],
            "gru encoder: num_layers=0; expected an integer >= 1",
        ),
        (
            {"name": "resnet18", "width": 0},
            [3, 8, 8],
            "resnet18 encoder: width=0; expected an integer >= 1",
        ),
        (
            {"name": "resnet18", "blocks": [2, -1]},
            [3, 8, 8],
            "resnet18 encoder: blocks=[2, -1]; expected a list of integers >= 0",
        ),
    ],
)
def test_encoders_refuse_bad_sizes_naming_where_they_came_from(
    spec: dict[str, object], shape: list[int], message: str
) -> None:
    with pytest.raises(MMLearnError, match=exact(f"model.encoders.x: {message}")):
        build_encoder(spec, shape, 4, where="model.encoders.x")
    with pytest.raises(
        MMLearnError,
        match=exact("model.encoders.x: out_dim=0; expected an integer >= 1 (embed_dim)"),
    ):
        build_encoder({"name": "mlp"}, [4], 0, where="model.encoders.x")


def test_make_head_refuses_a_negative_width_and_a_bad_dropout() -> None:
    with pytest.raises(
        MMLearnError, match=exact("head: hidden=-3; expected a width >= 1 (null or 0: linear)")
    ):
        make_head(6, 3, -3)
    with pytest.raises(
        MMLearnError, match=exact("head: dropout=1.0; expected a probability in [0, 1)")
    ):
        make_head(6, 3, 5, 1.0)


def test_default_architecture_and_saved_hyperparameters() -> None:
    model = InterOnly(input_shapes=SHAPES, num_classes=K, optimizer=SGD0)
    # embed_dim 128 per encoder, concat fusion, a 128-wide hidden layer, no dropout
    assert [model.joint.encoders[m].out_dim for m in SHAPES] == [128, 128]
    head = model.joint.head
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (256, 128, K)
    assert head[2].p == 0.0
    hparams = dict(model.hparams)
    # save_hyperparameters reads the constructor's frame: a tool that wraps __init__ (mutation
    # testing's trampolines) leaves it empty, so the values are compared when there are any
    if hparams:
        assert hparams == {
            "input_shapes": SHAPES,
            "num_classes": K,
            "multilabel": False,
            "encoders": None,
            "embed_dim": 128,
            "fusion": "concat",
            "fusion_rank": 4,
            "head_hidden": 128,
            "dropout": 0.0,
            "clip_grad_norm": None,
        }  # the optimiser and scheduler factories are not hyperparameters (not serialisable)
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    scheduled = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4, lr_scheduler=sched)
    assert "lr_scheduler" not in scheduled.hparams
    multi = MultiObjective(
        rule=Sum(), moments=EMAMoments(), input_shapes=SHAPES, num_classes=K, embed_dim=4
    )
    # the rule and the moments estimator are objects (chosen by class path), not hyperparameters
    assert "rule" not in multi.hparams and "moments" not in multi.hparams
    if multi.hparams:
        assert multi.hparams["every"] == 1


def test_the_gradient_strategies_defaults() -> None:
    kw = {"input_shapes": SHAPES, "num_classes": K, "embed_dim": 4}
    multi = MultiObjective(**kw)  # rule None: the plain sum, through the manual step
    assert type(multi.rule) is Sum and type(multi.moments) is BatchRows
    assert multi.every == 1 and multi.clip_grad_norm is None
    assert multi.automatic_optimization is False
    assert multi.objective_names == [FUSED, "a", "b"]
    assert type(MultiObjective(rule=None, **kw).rule) is Sum
    bogc = BOGC(**kw)
    assert type(bogc.rule) is BOGCCalibration
    assert (bogc.rule.eps_rel, bogc.rule.e_max) == (1e-3, 1e3)
    assert type(bogc.moments) is EMAMoments and bogc.moments.beta == 0.9
    assert bogc.automatic_optimization is False and bogc.every == 1
    tuned = BOGC(eps_rel=0.05, e_max=7.0, moments=LastLayer(), every=3, **kw)
    assert (tuned.rule.eps_rel, tuned.rule.e_max, tuned.every) == (0.05, 7.0, 3)
    assert type(tuned.moments) is LastLayer
    mgda = MGDA()
    assert (mgda.scale, mgda.normalize, mgda.scope) == (1.0, False, "global")
    reference = LateFusionHeads(**kw)  # the reference: automatic optimisation of the sum
    assert reference.automatic_optimization is True
    assert reference.objective_names == [FUSED, "a", "b"]
    assert STRATEGIES["LateFusionHeads"] is LateFusionHeads
    # manual optimisation is MultiObjective's (BOGC and MMPareto are presets of it) and MLA's
    manual = {
        name
        for name, cls in STRATEGIES.items()
        if not cls(**kw).automatic_optimization  # type: ignore[call-arg]
    }
    assert manual == {n for n, c in STRATEGIES.items() if issubclass(c, (MultiObjective, MLA))}
    assert manual >= {"MultiObjective", "BOGC"}


def test_the_gradient_strategies_validate_their_options() -> None:
    kw = {"input_shapes": SHAPES, "num_classes": K, "embed_dim": 4}
    for bad in ({"eps_rel": 0.0}, {"eps_rel": -1.0}):
        with pytest.raises(
            MMLearnError, match=exact(f"BOGC: eps_rel={bad['eps_rel']}; expected > 0")
        ):
            BOGC(**bad, **kw)
    with pytest.raises(MMLearnError, match=exact("BOGC: e_max=0.0; expected > 0")):
        BOGC(e_max=0.0, **kw)
    with pytest.raises(
        MMLearnError, match=exact("MGDA: scope='encoder'; expected one of ['global', 'per_group']")
    ):
        MGDA(scope="encoder")
    with pytest.raises(MMLearnError, match=exact("MGDA: scale=0.0; expected > 0")):
        MGDA(scale=0.0)
    assert MGDA(scope="per_group", scale=3.0).scope == "per_group"
    for removed in ({"variance": "ema"}, {"beta": 0.5}, {"n_chunks": 4}, {"eps": 1e-8}):
        with pytest.raises(TypeError):  # the old options are gone, not silently ignored
            BOGC(**removed, **kw)
    with pytest.raises(TypeError):
        MultiObjective(local_statistics=True, **kw)


def test_fusion_rank_dropout_and_encoder_specs_reach_the_modules() -> None:
    lrtf = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=6, fusion="lrtf")
    assert [tuple(f.shape) for f in lrtf.joint.fusion.factors.values()] == [(4, 7, 6), (4, 7, 6)]
    ranked = InterOnly(
        input_shapes=SHAPES, num_classes=K, embed_dim=6, fusion="lrtf", fusion_rank=2
    )
    assert ranked.joint.fusion.rank_weights.shape == (2,)
    assert ranked.joint.fusion.factors["a"].shape == (2, 7, 6)
    dropped = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=6, dropout=0.3)
    assert dropped.joint.head[2].p == 0.3
    spec = IntraOnly(
        input_shapes=SHAPES, num_classes=K, embed_dim=6, encoders={"a": {"hidden": [7]}}
    )
    linears = [m for m in spec.experts["a"].encoder.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 7), (7, 6)]
    default = [m for m in spec.experts["b"].encoder.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in default] == [(3, 256), (256, 6)]
    with pytest.raises(
        MMLearnError,
        match=exact(
            "model.encoders.b: encoder 'mlp' has no option(s) ['width']; "
            "its options are ['hidden', 'dropout']"
        ),
    ):
        InterOnly(input_shapes=SHAPES, num_classes=K, encoders={"b": {"width": 3}})


def test_configure_optimizers_binds_the_scheduler_to_the_optimiser() -> None:
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    plain = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4, optimizer=sgd)
    opt = plain.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(plain.parameters()))
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = InterOnly(
        input_shapes=SHAPES, num_classes=K, embed_dim=4, optimizer=sgd, lr_scheduler=sched
    )
    out = model.configure_optimizers()
    assert set(out) == {"optimizer", "lr_scheduler"}
    assert isinstance(out["optimizer"], torch.optim.SGD)
    assert isinstance(out["lr_scheduler"], torch.optim.lr_scheduler.StepLR)
    assert out["lr_scheduler"].optimizer is out["optimizer"]


def test_late_fusion_parameter_groups_are_named_by_what_they_hold() -> None:
    model = LateFusionHeads(input_shapes=SHAPES, num_classes=K, embed_dim=4)
    groups = model.parameter_groups()
    assert [(g.name, g.objectives) for g in groups] == [
        ("encoder.a", [FUSED, "a"]),
        ("encoder.b", [FUSED, "b"]),
        ("fused_head", [FUSED]),
        ("head.a", ["a"]),
        ("head.b", ["b"]),
    ]
    fused = {id(p) for p in [*model.joint.fusion.parameters(), *model.joint.head.parameters()]}
    assert {id(p) for p in groups[2].params} == fused


# ---- multi-label branches ------------------------------------------------------------------------
def test_multilabel_loss_and_nll_take_integer_and_bool_multi_hot_targets() -> None:
    model = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4, multilabel=True)
    z = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]])
    t = torch.tensor([[1, 0, 1], [0, 0, 1]])
    p = torch.sigmoid(z)
    bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    torch.testing.assert_close(model.loss(z, t), bce)  # int64 targets
    torch.testing.assert_close(model.log_proba(z), F.logsigmoid(z))
    for target in (t, t.bool(), t.float()):
        torch.testing.assert_close(model.nll(model.log_proba(z), target), bce)
    assert model.predicted(model.log_proba(z)).tolist() == [[1, 0, 1], [0, 0, 1]]
    single = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4)
    torch.testing.assert_close(single.log_proba(z), z - z.exp().sum(-1, keepdim=True).log())
    assert single.predicted(single.log_proba(z)).tolist() == [0, 2]


def test_intra_only_multilabel_product_and_missing_modalities() -> None:
    g = torch.Generator().manual_seed(3)
    z = {m: torch.randn(4, K, generator=g) * 2 for m in SHAPES}
    t = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
    present = {"a": torch.tensor([True, False, True, True]), "b": torch.ones(4, dtype=torch.bool)}
    for mode in ("joint", "independent"):
        model = IntraOnly(
            mode=mode, input_shapes=SHAPES, num_classes=K, embed_dim=4, multilabel=True
        )
        # K Bernoulli experts per label: the product's logit is the sum of the logits
        s = z["a"] + z["b"]
        torch.testing.assert_close(model.predict_log_proba(z), F.logsigmoid(s))
        dropped = torch.where(present["a"][:, None], s, z["b"])
        torch.testing.assert_close(model.predict_log_proba(z, present), F.logsigmoid(dropped))
    joint = IntraOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4, multilabel=True)
    (loss,) = joint.objectives(z, t).values()
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(z["a"] + z["b"], t.float()))
    single = IntraOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4)
    torch.testing.assert_close(single.predict_log_proba(z, present), masked_product(z, present))


def test_i2m2_multilabel_and_missing_joint_rules() -> None:
    g = torch.Generator().manual_seed(4)
    z = {k: torch.randn(4, K, generator=g) * 2 for k in (FUSED, *SHAPES)}
    t = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
    present = {"a": torch.tensor([True, False, True, True]), "b": torch.ones(4, dtype=torch.bool)}
    kw = {"input_shapes": SHAPES, "num_classes": K, "embed_dim": 4}
    multi = I2M2(multilabel=True, **kw)
    total = z[FUSED] + z["a"] + z["b"]
    (loss,) = multi.objectives(z, t).values()
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(total, t.float()))
    # a missing modality drops its own term; "impute" keeps the joint term
    kept = total - torch.where(present["a"][:, None], 0.0, z["a"])
    torch.testing.assert_close(multi.predict_log_proba(z, present), F.logsigmoid(kept))
    drop = I2M2(missing_joint="drop", **kw)
    assert drop.missing_joint == "drop"
    joint_mask = {FUSED: torch.tensor([True, False, True, True])}
    torch.testing.assert_close(
        drop.predict_log_proba(z, present), masked_product(z, {**present, **joint_mask})
    )
    impute = I2M2(**kw)
    assert impute.missing_joint == "impute"
    torch.testing.assert_close(impute.predict_log_proba(z, present), masked_product(z, present))
    torch.testing.assert_close(drop.predict_log_proba(z), masked_product(z, None))


# ---- batch, data and checkpoint checks -----------------------------------------------------------
CHECK_SHAPES = {"v": [4], "img": [1, 3, 5], "seq": [5, 3], "tok": [6]}


def check_inputs(**override: Tensor) -> dict[str, Tensor]:
    inputs = {
        "v": torch.zeros(2, 4),
        "img": torch.zeros(2, 1, 3, 5),
        "seq": torch.zeros(2, 9, 3),  # sequences may be longer or shorter than [5, 3]
        "tok": torch.zeros(2, 11, dtype=torch.long),  # token ids may be of any length
    }
    return inputs | override


def test_check_batch_accepts_variable_lengths_and_names_a_wrong_shape() -> None:
    model = InterOnly(input_shapes=CHECK_SHAPES, num_classes=K, embed_dim=4)
    target = torch.zeros(2, dtype=torch.long)
    model.check_batch(MultimodalBatch(check_inputs(), target), "val")
    short = check_inputs(seq=torch.zeros(2, 2, 3), tok=torch.zeros(2, 1, dtype=torch.long))
    model.check_batch(MultimodalBatch(short, target), "val")
    bad = {
        "v": (torch.zeros(2, 5), "[5], expected [4]"),
        "img": (torch.zeros(2, 1, 4, 5), "[1, 4, 5], expected [1, 3, 5]"),
        "seq": (torch.zeros(2, 5, 4), "[5, 4], expected [5, 3]"),
        "tok": (torch.zeros(2, 6, 2, dtype=torch.long), "[6, 2], expected [6]"),
    }
    bad["v2"] = (torch.zeros(2, 4, 1), "[4, 1], expected [4]")
    for m, (x, text) in bad.items():
        name = m.rstrip("2")
        with pytest.raises(
            MMLearnError, match=exact(f"val batch: modality {name!r} has sample shape {text}")
        ):
            model.check_batch(MultimodalBatch(check_inputs(**{name: x}), target), "val")


def test_every_step_refuses_a_batch_with_other_modalities() -> None:
    model = I2M2(input_shapes=SHAPES, num_classes=K, embed_dim=4)
    (batch,) = make_batches([2])
    batch.inputs = {"a": batch.inputs["a"], "c": batch.inputs["b"]}
    steps = {
        "train": model.training_step,
        "val": model.validation_step,
        "test": model.test_step,
        "predict": model.predict_step,
    }
    for stage, step in steps.items():
        with pytest.raises(
            MMLearnError,
            match=exact(f"{stage} batch has modalities ['a', 'c'], the model knows ['a', 'b']"),
        ):
            step(batch, 0)


def test_impute_missing_zeroes_absent_samples_only() -> None:
    g = torch.Generator().manual_seed(5)
    inputs = {
        "v": torch.randn(3, 4, generator=g) + 5,
        "img": torch.randn(3, 1, 2, 2, generator=g) + 5,
        "w": torch.randn(3, 2, generator=g) + 5,  # no mask: always present
    }
    originals = {m: x.clone() for m, x in inputs.items()}
    present = {"v": torch.tensor([True, False, True]), "img": torch.tensor([False, True, True])}
    batch = MultimodalBatch(inputs=inputs, target=torch.zeros(3, dtype=torch.long), present=present)
    out = impute_missing(batch)
    assert set(out) == {"v", "img", "w"}
    assert {m: tuple(x.shape) for m, x in out.items()} == {
        m: tuple(x.shape) for m, x in originals.items()
    }
    assert torch.equal(out["v"][1], torch.zeros(4))
    assert torch.equal(out["v"][[0, 2]], originals["v"][[0, 2]])
    assert torch.equal(out["img"][0], torch.zeros(1, 2, 2))
    assert torch.equal(out["img"][1:], originals["img"][1:])
    assert torch.equal(out["w"], originals["w"])
    for m in inputs:  # the batch itself is left as it was
        assert torch.equal(batch.inputs[m], originals[m])
    full = MultimodalBatch(inputs=inputs, target=torch.zeros(3, dtype=torch.long))
    assert impute_missing(full) is inputs


def test_on_load_checkpoint_refuses_a_model_of_other_modalities() -> None:
    model = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4)
    model.on_load_checkpoint({"hyper_parameters": {"input_shapes": {"b": [3], "a": [4]}}})
    model.on_load_checkpoint({"hyper_parameters": {"num_classes": K}})  # nothing to compare
    model.on_load_checkpoint({"state_dict": {}})
    with pytest.raises(
        MMLearnError,
        match=exact(
            "modality mismatch: the data has ['a', 'b'], the checkpoint's model was built for "
            "['a', 'c']; missing in the model: ['b'], unknown to the data: ['c']"
        ),
    ):
        model.on_load_checkpoint({"hyper_parameters": {"input_shapes": {"a": [4], "c": [3]}}})


SETUP_ERRORS = [
    pytest.param(
        TinyData(input_shapes={"a": [4], "c": [3], "d": [2]}),
        "modality mismatch: the data (TinyData) has ['a', 'c', 'd'], the model was built for "
        "['a', 'b']; missing in the model: ['c', 'd'], unknown to the data: ['b']",
        False,
        id="modalities",
    ),
    pytest.param(
        TinyData(input_shapes={"a": [4], "b": [5]}),
        "input shape mismatch for modality 'b': the data gives [5], the model expects [3]",
        False,
        id="shape",
    ),
    pytest.param(
        TinyData(num_classes=4), "the data has 4 classes, the model was built for 3", False, id="k"
    ),
    pytest.param(
        TinyData(multilabel=True),
        "the data is multi-label, the model was built with multilabel=False",
        False,
        id="multi-data",
    ),
    pytest.param(
        TinyData(multilabel=False),
        "the data is single-label, the model was built with multilabel=True",
        True,
        id="multi-model",
    ),
]


@pytest.mark.parametrize(("data", "message", "multilabel"), SETUP_ERRORS)
def test_fit_refuses_data_the_model_was_not_built_for(
    data: TinyData, message: str, multilabel: bool
) -> None:
    model = IntraOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4, multilabel=multilabel)
    with pytest.raises(MMLearnError, match=exact(message)):
        trainer().fit(model, datamodule=data)


def test_setup_passes_without_a_trainer_a_datamodule_or_label_facts() -> None:
    model = IntraOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4, optimizer=SGD0)
    model.setup("fit")  # not attached to a Trainer: nothing to compare
    batches = make_batches([2])
    trainer(max_steps=1).fit(model, Loader(batches), Loader(batches))  # no DataModule
    fitted = trainer(max_steps=1)
    fitted.fit(model, datamodule=ShapesOnly(batches))  # single-label with K classes is assumed
    assert fitted.global_step == 1


# ---- what a Trainer run logs ---------------------------------------------------------------------
Run = tuple[IntraOnly, list[MultimodalBatch], dict[str, Tensor], set[str], dict[str, float]]


@pytest.fixture(scope="module")
def independent_run() -> Run:
    """IntraOnly (independent: two objectives) trained with lr 0, then validated with masks.

    Returns the model, the training batches, what fit logged, the progress-bar keys after fit and
    the validation scores.
    """
    torch.manual_seed(0)
    model = IntraOnly(
        mode="independent", input_shapes=SHAPES, num_classes=K, embed_dim=5, optimizer=SGD0
    )
    batches = make_batches([4, 2], seed=1)
    run = trainer()
    run.fit(model, datamodule=TinyData(batches))
    fit_metrics, bar = dict(run.callback_metrics), set(run.progress_bar_metrics)
    masked = make_batches([5, 3], seed=2, masks=True)
    (val,) = run.validate(model, datamodule=TinyData(masked), verbose=False)
    return model, batches, fit_metrics, bar, val


def test_training_logs_the_loss_and_each_objective(independent_run: Run) -> None:
    model, batches, metrics, bar, _ = independent_run
    everything, last = cat(batches), batches[-1]
    with torch.no_grad():
        z_all = expert_logits(model, everything.inputs)
        z_last = expert_logits(model, last.inputs)
    for m in SHAPES:
        ce_all = float(F.cross_entropy(z_all[m], everything.target))
        assert float(metrics[f"train/loss/{m}_epoch"]) == pytest.approx(ce_all, rel=1e-5)
        ce_last = float(F.cross_entropy(z_last[m], last.target))
        assert float(metrics[f"train/loss/{m}_step"]) == pytest.approx(ce_last, rel=1e-5)
    total = sum(float(F.cross_entropy(z_all[m], everything.target)) for m in SHAPES)
    assert float(metrics["train/loss_epoch"]) == pytest.approx(total, rel=1e-5)
    # accuracy of the product and of each expert, per epoch only
    pred = masked_product(z_all, None).argmax(-1)
    assert float(metrics["train/acc"]) == pytest.approx(
        float((pred == everything.target).float().mean())
    )
    for m in SHAPES:
        acc_m = float((z_all[m].argmax(-1) == everything.target).float().mean())
        assert float(metrics[f"train/acc/{m}"]) == pytest.approx(acc_m)
    train_keys = {k for k in metrics if k.startswith("train/")}
    assert train_keys == {
        "train/acc",
        "train/f1",
        "train/acc/a",
        "train/acc/b",
        *(f"train/loss{s}{t}" for s in ("", "/a", "/b") for t in ("", "_step", "_epoch")),
    }
    # the progress bar shows the final metrics only
    assert bar == {"train/acc", "train/f1", "val/acc", "val/f1"}


def test_validation_scores_the_prediction_with_missing_modalities(independent_run: Run) -> None:
    model, _, _, _, val = independent_run
    data = cat(make_batches([5, 3], seed=2, masks=True))
    with torch.no_grad():
        z = expert_logits(model, data.inputs)
    log_probs = masked_product(z, data.present)
    unmasked = masked_product(z, None)
    assert float((log_probs - unmasked).abs().max()) > 0.1  # the masks matter here
    assert val["val/loss"] == pytest.approx(float(F.nll_loss(log_probs, data.target)), rel=1e-5)
    acc = float((log_probs.argmax(-1) == data.target).float().mean())
    assert val["val/acc"] == pytest.approx(acc)
    assert data.present is not None
    for m in SHAPES:  # a unimodal accuracy counts the samples that have the modality only
        right = z[m].argmax(-1) == data.target
        acc_m = float(right[data.present[m]].float().mean())
        assert val[f"val/acc/{m}"] == pytest.approx(acc_m)


def test_single_objective_runs_log_their_one_objective_too() -> None:
    torch.manual_seed(0)
    model = InterOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4, optimizer=SGD0)
    run = trainer()
    (batch,) = make_batches([3])
    caught = fit_recording_warnings(run, model, TinyData([batch]))
    metrics = run.callback_metrics
    assert {k for k in metrics if k.startswith("train/loss")} == {
        f"train/loss{name}{s}" for name in ("", "/fused") for s in ("", "_step", "_epoch")
    }
    j = model.joint
    with torch.no_grad():
        z = j.head(j.fusion({m: j.encoders[m](batch.inputs[m]) for m in SHAPES}))
    ce = float(F.cross_entropy(z, batch.target))
    assert float(metrics["train/loss/fused_step"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["train/loss_step"]) == pytest.approx(ce, rel=1e-5)
    assert "val/loss" in metrics
    # every logged value comes with its batch size: Lightning need not guess it from the batch
    assert not [w for w in caught if "batch_size" in w]


def test_gradient_rule_runs_log_cosines_with_their_batch_size() -> None:
    torch.manual_seed(0)
    model = MultiObjective(
        rule=Sum(), input_shapes=SHAPES, num_classes=K, embed_dim=4, optimizer=SGD0
    )
    run = trainer()
    caught = fit_recording_warnings(run, model, TinyData(make_batches([3])))
    assert {"train/cos/a_step", "train/cos/b_epoch"} <= set(run.callback_metrics)
    assert not [w for w in caught if "batch_size" in w]


def test_predict_and_test_follow_the_masks_and_impute_for_the_joint_expert() -> None:
    torch.manual_seed(0)
    model = I2M2(input_shapes=SHAPES, num_classes=K, embed_dim=4)
    batches = make_batches([5, 3], seed=3, masks=True)
    run = trainer()
    (scores,) = run.test(model, datamodule=TinyData(batches), verbose=False)
    out = run.predict(model, datamodule=TinyData(batches))
    assert out is not None
    data = cat(batches)
    assert data.present is not None
    zeroed = {m: torch.where(data.present[m][:, None], x, 0.0) for m, x in data.inputs.items()}
    with torch.no_grad():
        joint = model.joint
        feats = {m: joint.encoders[m](zeroed[m]) for m in SHAPES}
        z = {FUSED: joint.head(joint.fusion(feats)), **expert_logits(model, data.inputs)}
    log_probs = masked_product(z, data.present)
    got = torch.cat([o["log_probs"] for o in out])  # type: ignore[index]
    torch.testing.assert_close(got, log_probs, atol=1e-5, rtol=1e-5)
    pred = torch.cat([o["pred"] for o in out])  # type: ignore[index]
    assert torch.equal(pred, log_probs.argmax(-1))
    assert scores["test/loss"] == pytest.approx(float(F.nll_loss(log_probs, data.target)), 1e-5)
    for m in SHAPES:  # a unimodal accuracy counts the samples that have the modality only
        right = z[m].argmax(-1) == data.target
        acc_m = float(right[data.present[m]].float().mean())
        assert scores[f"test/acc/{m}"] == pytest.approx(acc_m)


def test_multilabel_expert_accuracy_thresholds_the_sigmoid_of_the_logits() -> None:
    """Logits in [0, 1] are positive (sigmoid > 0.5), not probabilities below 0.5."""
    model = IntraOnly(input_shapes=SHAPES, num_classes=K, embed_dim=4, multilabel=True)
    with torch.no_grad():
        for e in model.experts.values():
            e.head.weight.zero_()
            e.head.bias.copy_(torch.tensor([0.3, 0.8, 0.1]))
    batches = make_batches([4], multilabel=True)
    batches[0].target = torch.ones(4, K, dtype=torch.long)  # every label on: all predictions right
    (val,) = trainer().validate(model, datamodule=TinyData(batches, multilabel=True), verbose=False)
    assert val["val/acc/a"] == pytest.approx(1.0)
    assert val["val/acc/b"] == pytest.approx(1.0)
    assert val["val/acc"] == pytest.approx(1.0)


# ---- I2M2 expert loading -------------------------------------------------------------------------
def params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_i2m2_loads_the_joint_and_a_modality_expert_from_checkpoints(tmp_path: Path) -> None:
    kw = {"input_shapes": SHAPES, "num_classes": K, "embed_dim": 4}
    torch.manual_seed(0)
    source = I2M2(**kw)
    ckpt = tmp_path / "source.ckpt"
    # a Lightning checkpoint holds more than tensors, e.g. factories among the hyperparameters
    extra = {"optimizer": functools.partial(torch.optim.SGD, lr=0.1)}
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": extra}, ckpt)
    torch.manual_seed(1)
    target = I2M2(**kw)
    own = {m: params(e) for m, e in target.experts.items()}
    assert not same(params(target.joint), params(source.joint))
    target.load_expert("joint", ckpt)
    assert same(params(target.joint), params(source.joint))
    assert all(same(params(target.experts[m]), own[m]) for m in SHAPES)  # experts untouched
    target.load_expert("b", str(ckpt))
    assert same(params(target.experts["b"]), params(source.experts["b"]))
    assert same(params(target.experts["a"]), own["a"])
    # the same through the constructor
    torch.manual_seed(2)
    built = I2M2(init_from={"joint": str(ckpt), "a": str(ckpt)}, **kw)
    assert same(params(built.joint), params(source.joint))
    assert same(params(built.experts["a"]), params(source.experts["a"]))
    assert not same(params(built.experts["b"]), params(source.experts["b"]))


def test_i2m2_load_expert_errors(tmp_path: Path) -> None:
    kw = {"input_shapes": SHAPES, "num_classes": K, "embed_dim": 4}
    model = I2M2(**kw)
    with pytest.raises(
        MMLearnError,
        match=exact("I2M2.init_from: unknown key 'c'; expected 'joint' or one of ['a', 'b']"),
    ):
        model.load_expert("c", tmp_path / "x.ckpt")
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(
        FileNotFoundError,
        match=exact(f"I2M2.init_from.joint: checkpoint {str(missing)!r} not found"),
    ):
        model.load_expert("joint", missing)
    inter = tmp_path / "inter.ckpt"
    torch.save({"state_dict": InterOnly(**kw).state_dict()}, inter)
    model.load_expert("joint", inter)  # an InterOnly run gives the joint expert...
    with pytest.raises(
        MMLearnError,
        match=exact(
            f"I2M2.init_from.a: checkpoint {str(inter)!r} has no weights under 'experts.a.' "
            "(the joint expert comes from an InterOnly/I2M2 run, a modality's expert from an "
            "IntraOnly/I2M2 run of the same architecture)"
        ),
    ):
        model.load_expert("a", inter)  # ...but no unimodal expert
    other = tmp_path / "other.ckpt"
    state = InterOnly(**kw).state_dict()
    state["joint.head.extra"] = torch.zeros(1)
    torch.save({"state_dict": state}, other)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # architectures must match exactly
        model.load_expert("joint", other)


def test_epoch_metrics_are_logged_in_every_epoch_and_every_stage() -> None:
    # Metric objects are registered with Lightning once per epoch and stage: a validation or
    # test run that did not register them again would log no value for them
    seen: list[set[str]] = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            seen.append(set(trainer.logged_metrics))

    data = SyntheticMultimodal(
        num_modalities=2,
        dim=[3, 2],
        num_classes=3,
        n_train=24,
        n_val=12,
        n_test=12,
        batch_size=12,
        seed=0,
    )
    model = InterOnly(input_shapes=data.input_shapes, num_classes=3, embed_dim=4)
    fitted = trainer(max_epochs=3, callbacks=[Record()])
    fitted.fit(model, datamodule=data)
    assert len(seen) == 3
    for keys in seen:
        assert {"train/acc", "train/f1", "val/acc", "val/f1"} <= keys, keys
    # Lightning computes and resets what is registered at each epoch's end: a validation metric
    # left unregistered would keep accumulating over runs
    for stage in ("train", "val"):
        for name, metric in model.final_metrics[key(stage)].items():
            assert metric._update_count == 0, (stage, name, metric._update_count)
    fitted.test(model, datamodule=data, verbose=False)
    fitted.test(model, datamodule=data, verbose=False)
    assert {"test/acc", "test/f1"} <= set(fitted.logged_metrics)
