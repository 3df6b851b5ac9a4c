"""The TorchJD rule: torchjd's aggregators (arXiv 2406.16232) behind mmlearn's Rule interface.

Checked against torchjd's own aggregators on the same matrices (every scope, stacked by hand),
torchjd's UPGrad against values worked out by hand from the paper's definition, the gradients a
``MultiObjective`` writes against torchjd on the Jacobian built from one ``autograd.grad`` per
objective and group (``tests/reference.py``), and a real ``mmlearn fit`` of the shipped config.
The tests that need torchjd skip without it (fail under CI, which installs the dev extra).
"""

from __future__ import annotations

import copy
import functools
import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import Tensor

from helpers import quiet_trainer, require  # noqa: I001  (tests/helpers.py)
from mmlearn.cli import build_cli, main
from mmlearn.data import SyntheticMultimodal
from mmlearn.errors import MMLearnError
from mmlearn.gradients import Block, TorchJD
from mmlearn.gradients.torchjd import INSTALL_HINT, aggregator_names, available
from mmlearn.strategies import MultiObjective
from reference import groups_of, rows_of

REPO = Path(__file__).resolve().parents[2]
F64 = torch.float64
SHAPES = {"m0": [3], "m1": [2]}
OBJECTIVES = ["fused", "m0", "m1"]


@pytest.fixture
def tj() -> ModuleType:
    """``torchjd.aggregation`` (skips without torchjd; fails under CI)."""
    require(available(), f"torchjd with its quadprog solver is not installed: {INSTALL_HINT}")
    return importlib.import_module("torchjd.aggregation")


def close(a: Tensor, b: Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- hand-made matrices: the adapter gives what torchjd gives --------------------------------
def conflicting_2x3() -> Tensor:
    return torch.tensor([[1.0, 0.0, 2.0], [-3.0, 1.0, 0.5]], dtype=F64)  # g1.g2 = -2 < 0


def collinear_3x4() -> Tensor:
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    h = torch.tensor([-2.0, 1.0, 1.0, -1.0], dtype=F64)  # conflicts with g
    return torch.stack([g, 2.5 * g, h])  # a collinear pair: a singular Gramian


def random_4x50() -> Tensor:
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=F64)


MATRICES = {"2x3": conflicting_2x3, "3x4": collinear_3x4, "4x50": random_4x50}
#: name -> (init args, fewest rows it accepts): every aggregator that needs no extra solver but
#: torchjd's quadprog extra (CAGrad and Nash-MTL need cvxpy), stateful ones included
AGGREGATORS: dict[str, tuple[dict[str, Any], int]] = {
    "UPGrad": ({}, 1),
    "DualProj": ({}, 1),
    "PCGrad": ({}, 1),
    "MGDA": ({}, 1),
    "IMTLG": ({}, 1),
    "AlignedMTL": ({}, 1),
    "Mean": ({}, 1),
    "Sum": ({}, 1),
    "Random": ({}, 1),
    "Krum": ({"n_byzantine": 1}, 4),
    "FairGrad": ({"alpha": 1.0}, 1),
    "GradVac": ({}, 1),
    "PCD": ({}, 1),
    "ExcessMTL": ({}, 1),
    "ConFIG": ({}, 1),
    "GradDrop": ({}, 1),
    "TrimmedMean": ({"trim_number": 1}, 3),
}


CASES = [
    (name, matrix)
    for name, (_, fewest) in AGGREGATORS.items()
    for matrix, make in MATRICES.items()
    if make().shape[0] >= fewest  # Krum and TrimmedMean need more rows than 2x3 and 3x4 have
]


@pytest.mark.parametrize(("name", "matrix"), CASES)
def test_the_rule_gives_torchjds_aggregation(tj: ModuleType, name: str, matrix: str) -> None:
    kwargs, _ = AGGREGATORS[name]
    jac = MATRICES[matrix]()
    cls = getattr(tj, name)
    torch.manual_seed(5)  # the same global draws for both (PCGrad, Random, GradDrop, GradVac)
    expected = cls(**kwargs)(jac)
    torch.manual_seed(5)
    rule = TorchJD(cls(**kwargs), seed=None)
    row, w = rule(jac)
    close(row, expected)
    if isinstance(rule.aggregator, tj.WeightedAggregator):
        assert w.shape == (jac.shape[0],)
        close(w @ jac, row, 1e-12)
        assert rule.coefficients(w) is w
    else:  # per-dimension weights, which reproduce the row but are not re-applied
        assert w.shape == jac.shape and rule.coefficients(w) is None
        close((w * jac).sum(0), row, 1e-12)
        with pytest.raises(MMLearnError, match=rf"TorchJD\({name}\): .*every=1"):
            rule.apply(jac, w)


def test_upgrad_by_hand_from_the_papers_definition(tj: ModuleType) -> None:
    """UPGrad(J) = (1/m) sum_i pi_J(g_i), pi_J the projection onto the dual cone
    {x : g_k . x >= 0 for every k} (Quinton and Rey, section 3, with the mean preference)."""
    linalg = importlib.import_module("torchjd.linalg")
    exact = tj.UPGrad(projector=linalg.QuadprogProjector(reg_eps=0.0))  # no regularisation
    # orthogonal rows lie in the dual cone: each projects onto itself, the mean is their half-sum
    ortho = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    close(tj.UPGrad()(ortho), torch.tensor([0.5, 1.0], dtype=F64), 1e-9)
    # opposed rows of equal norm: the cone is the line x_1 = 0, both project to 0
    opposed = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    close(tj.UPGrad()(opposed), torch.zeros(2, dtype=F64), 1e-9)
    # g1 = (1, 0), g2 = (-1, 1) conflict (g1.g2 = -1): the cone is {0 <= x_1 <= x_2}. g1 breaks
    # x_2 >= x_1 and projects onto that line: (1/2, 1/2); g2 breaks x_1 >= 0 and projects onto
    # x_1 = 0: (0, 1). Mean: (1/4, 3/4), i.e. weights (1, 3/4) on (g1, g2).
    conflict = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    by_hand = torch.tensor([0.25, 0.75], dtype=F64)
    close(exact(conflict), by_hand, 1e-9)
    close(tj.UPGrad()(conflict), by_hand, 1e-3)  # the default regularises the Gramian (1e-4 I)
    row, w = TorchJD(exact)(conflict)
    close(row, by_hand, 1e-9)
    close(w, torch.tensor([1.0, 0.75], dtype=F64), 1e-9)
    assert (conflict @ row >= 0).all()  # conflicts with neither objective


# ---- scopes: the matrices the aggregator sees, stacked by hand --------------------------------
def blocks(seed: int = 3) -> list[Block]:
    """Two encoders (fused objective 0 with 1, and with 2), a fused head and two heads."""
    g = torch.Generator().manual_seed(seed)
    spec = [((0, 1), 5), ((2, 0), 4), ((0,), 3), ((1,), 2), ((2,), 6)]
    return [Block(torch.randn(len(o), p, generator=g, dtype=F64), o) for o, p in spec]


def stacked(parts: list[Block]) -> Tensor:
    """``J [3, sum P]``: every block's rows at their objectives, zero elsewhere."""
    cols = []
    for b in parts:
        col = torch.zeros(3, b.rows.shape[1], dtype=F64)
        col[list(b.objectives)] = b.rows
        cols.append(col)
    return torch.cat(cols, dim=1)


def split(vector: Tensor, parts: list[Block]) -> list[Tensor]:
    return list(vector.split([b.rows.shape[1] for b in parts]))


@pytest.mark.parametrize("name", ["UPGrad", "Mean", "ConFIG"])  # gramian, weighted, general
@pytest.mark.parametrize("scope", ["global", "shared", "per_group"])
def test_each_scope_aggregates_the_matrix_it_names(tj: ModuleType, name: str, scope: str) -> None:
    bs = blocks()
    agg = getattr(tj, name)()
    if scope == "global":
        expected = split(agg(stacked(bs)), bs)
    elif scope == "shared":
        expected = split(agg(stacked(bs[:2])), bs[:2]) + [b.rows[0] for b in bs[2:]]
    else:  # each group's rows on their own, in the order of its objectives' positions
        expected = [
            agg(b.rows[sorted(range(len(b.objectives)), key=b.objectives.__getitem__)]) for b in bs
        ]
    rule = TorchJD(name, scope=scope)
    out = rule.combine(bs)
    assert len(out) == len(bs)
    for b, (row, w), exp in zip(bs, out, expected, strict=True):
        close(row, exp)
        n, p = b.rows.shape
        if name == "ConFIG" and not (scope == "shared" and n == 1):
            assert w.shape == (n, p)
            close((w * b.rows).sum(0), row, 1e-12)
        else:  # one weight per objective of the group, in the group's order
            assert w.shape == (n,)
            close(rule.apply(b.rows, w), row, 1e-12)


def test_the_global_gramian_path_never_stacks_and_matches_the_stacked_one(tj: ModuleType) -> None:
    bs = blocks()
    hooked = tj.UPGrad()
    hooked.register_forward_hook(lambda *_: None)  # a hook: the stacked, weighted path
    plain, stacked_rule = TorchJD(tj.UPGrad()), TorchJD(hooked)
    assert (plain.kind, stacked_rule.kind) == ("gramian", "weighted")
    for (r1, w1), (r2, w2) in zip(plain.combine(bs), stacked_rule.combine(bs), strict=True):
        close(r1, r2, 1e-9)
        close(w1, w2, 1e-9)


# ---- randomness: a private stream, the same on every rank --------------------------------------
def test_random_aggregators_draw_from_the_rules_own_stream(tj: ModuleType) -> None:
    jac = random_4x50()  # 4 conflicting rows: PCGrad's order of projections matters
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = TorchJD("PCGrad", seed=3), TorchJD("PCGrad", seed=3)
    first = [a(jac)[0] for _ in range(6)]
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left untouched
    torch.manual_seed(123)  # another global state: the same draws
    second = [b(jac)[0] for _ in range(6)]
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
    assert len({tuple(x.tolist()) for x in first}) > 1  # each call a new draw
    # with seed=None the global RNG decides, as in torchjd
    torch.manual_seed(9)
    expected = tj.PCGrad()(jac)
    torch.manual_seed(9)
    close(TorchJD("PCGrad", seed=None)(jac)[0], expected, 1e-12)


def test_stateful_aggregators_keep_one_state_per_group_in_per_group_scope(tj: ModuleType) -> None:
    # PCD keeps a moving average of each objective's squared gradient norm (keyed by their number)
    rule, alone = TorchJD("PCD", scope="per_group"), TorchJD("PCD", scope="per_group")
    for step in range(4):
        bs = blocks(seed=step)
        together = rule.combine(bs)
        by_itself = alone.combine([bs[1]])
    assert len(rule._copies) == len(bs) - 1  # group 0 uses the rule's own aggregator
    # each group's copy evolved as a PCD that only ever saw that group's rows
    close(together[1][0], by_itself[0][0], 1e-12)
    fresh = TorchJD("PCD")(bs[1].rows[[1, 0]])[0]
    assert float((fresh - by_itself[0][0]).abs().max()) > 1e-6  # the state matters here


# ---- building the rule: names, errors, the missing library -------------------------------------
def test_aggregators_are_chosen_by_instance_class_or_name(tj: ModuleType) -> None:
    for spec in (tj.IMTLG(), tj.IMTLG, "IMTLG", "imtl-g", "IMTL_G", "torchjd.aggregation.IMTLG"):
        assert type(TorchJD(spec).aggregator) is tj.IMTLG, spec
    assert type(TorchJD().aggregator) is tj.UPGrad  # the paper's aggregator by default
    assert {"UPGrad", "PCGrad", "MGDA", "DualProj", "IMTLG", "AlignedMTL"} <= set(
        aggregator_names()
    )
    assert "Aggregator" not in aggregator_names()  # the abstract bases are not choices


def test_bad_aggregators_are_refused_naming_them_and_the_valid_ones(tj: ModuleType) -> None:
    valid = r"expected one of \[.*'UPGrad'"
    with pytest.raises(MMLearnError, match=rf"unknown aggregator 'Nope'; {valid}"):
        TorchJD("Nope")
    with pytest.raises(MMLearnError, match=r"aggregator=Linear.* is not a torchjd Aggregator"):
        TorchJD(torch.nn.Linear(2, 2))
    with pytest.raises(MMLearnError, match=r"aggregator=UPGradWeighting is not a torchjd"):
        TorchJD(tj.UPGradWeighting)
    with pytest.raises(MMLearnError, match=r"'torch.nn.Linear' is not a torchjd Aggregator"):
        TorchJD("torch.nn.Linear")
    with pytest.raises(MMLearnError, match=r"'no.such.Class' cannot be imported"):
        TorchJD("no.such.Class")
    with pytest.raises(
        MMLearnError,
        match=r"TrimmedMean needs arguments .*class_path: torchjd.aggregation.TrimmedMean",
    ):
        TorchJD("TrimmedMean")
    with pytest.raises(MMLearnError, match=r"scope='model'; expected one of \['global'"):
        TorchJD("UPGrad", scope="model")


def test_without_torchjd_building_the_rule_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)  # import torchjd now raises ImportError
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    assert not available()
    with pytest.raises(MMLearnError, match=r"torchjd library is not installed.*\[torchjd\]"):
        TorchJD()
    with pytest.raises(MMLearnError, match=r"pip install 'mmlearn-lightning\[torchjd\]'"):
        TorchJD("PCGrad")


def test_importing_mmlearn_does_not_import_torchjd() -> None:
    code = (
        "import sys, mmlearn.gradients, mmlearn.strategies, mmlearn.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchjd', 'qpsolvers')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout


# ---- MultiObjective with the rule: what it writes to .grad -------------------------------------
def build(**kw: Any) -> MultiObjective:
    torch.manual_seed(0)
    return MultiObjective(
        input_shapes=dict(SHAPES),
        num_classes=3,
        embed_dim=4,
        head_hidden=5,
        encoders={m: {"name": "mlp", "hidden": [6]} for m in SHAPES},
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        **kw,
    )


def make_data(n_train: int = 72) -> SyntheticMultimodal:
    return SyntheticMultimodal(
        num_modalities=2,
        dim=[3, 2],
        num_classes=3,
        n_train=n_train,
        n_val=4,
        n_test=4,
        batch_size=24,
        intra=[1.0, 0.2],
        inter=1.0,
        seed=0,
    )


def trainer(steps: int) -> pl.Trainer:
    return quiet_trainer(
        max_epochs=None, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0
    )


def by_hand(agg: Any, model: MultiObjective, batch: Any, scope: str) -> dict[str, Tensor]:
    """``{group: [P]}``: torchjd's aggregator on the Jacobian ``scope`` names, from the rows of
    ``reference.rows_of`` (one ``autograd.grad`` per objective and group), objectives in the
    order fused, m0, m1."""
    rows = rows_of(model, batch.inputs, batch.target)
    groups = [(name, objectives) for name, _, objectives in groups_of(model)]
    if scope == "per_group":
        return {name: agg(rows[name]) for name, _ in groups}
    chosen = [(n, o) for n, o in groups if scope == "global" or len(o) > 1]
    cols = []
    for name, objectives in chosen:
        col = torch.zeros(len(OBJECTIVES), rows[name].shape[1], dtype=rows[name].dtype)
        col[[OBJECTIVES.index(k) for k in objectives]] = rows[name]
        cols.append(col)
    parts = agg(torch.cat(cols, dim=1)).split([c.shape[1] for c in cols])
    out = {name: part for (name, _), part in zip(chosen, parts, strict=True)}
    return {name: out[name] if name in out else rows[name][0] for name, _ in groups}


def grads(model: MultiObjective) -> dict[str, Tensor]:
    """Each reference group's ``.grad`` as one flat vector."""
    return {
        name: torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]
        for name, params, _ in groups_of(model)
    }


@pytest.mark.parametrize(
    ("name", "scope"),
    [("UPGrad", "global"), ("UPGrad", "shared"), ("DualProj", "per_group"), ("ConFIG", "global")],
)
def test_multi_objective_writes_the_aggregation_of_the_models_jacobian(
    tj: ModuleType, name: str, scope: str
) -> None:
    model = build(rule=TorchJD(name, scope=scope))
    start = copy.deepcopy(model)
    data = make_data()
    trainer(1).fit(model, datamodule=data)  # one step: the .grad it wrote is still there
    loader = data.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(0)  # type: ignore[union-attr]
    batch = next(iter(loader))
    expected = by_hand(getattr(tj, name)(), start, batch, scope)
    written = grads(model)
    assert written.keys() == expected.keys()
    for group, row in expected.items():
        close(written[group], row, 1e-5)
    assert any(float(r.abs().max()) > 1e-3 for r in expected.values())


def test_multi_objective_trains_a_few_steps_every_one_and_every_two(tj: ModuleType) -> None:
    for every in (1, 2):
        model = build(rule=TorchJD("UPGrad"), every=every)
        fitted = trainer(3)
        fitted.fit(model, datamodule=make_data())
        assert fitted.global_step == 3
        assert torch.isfinite(fitted.callback_metrics["train/loss"])
        assert model.cached_weights is not None
        assert all(w.dim() == 1 for w in model.cached_weights.values())  # reusable: one backward


def test_every_above_one_refuses_an_aggregator_without_weights(tj: ModuleType) -> None:
    model = build(rule=TorchJD("ConFIG"), every=2)
    refused = r"TorchJD\(ConFIG\): this aggregator has no weighting"
    with pytest.raises(MMLearnError, match=refused):
        trainer(2).fit(model, datamodule=make_data())


# ---- the command line ------------------------------------------------------------------------
def test_mmlearn_fit_runs_the_shipped_synthetic_upgrad_config(tj: ModuleType, run_cli) -> None:
    cli = run_cli(
        "fit",
        "--config",
        str(REPO / "experiments/synthetic/upgrad.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    rule = cli.model.rule
    assert isinstance(rule, TorchJD) and type(rule.aggregator) is tj.UPGrad
    assert rule.scope == "global"
    # the run's config names the aggregator and rebuilds the same rule
    run = Path(cli.trainer.log_dir)
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["rule"]
    assert saved["class_path"] == "mmlearn.gradients.TorchJD"
    assert saved["init_args"]["aggregator"]["class_path"] == "torchjd.aggregation.UPGrad"
    last = run / "checkpoints" / "last.ckpt"
    again = run_cli("test", "--config", str(run / "config.yaml"), "--ckpt_path", str(last))
    assert type(again.model.rule.aggregator) is tj.UPGrad and again.model.rule.scope == "global"


def test_the_command_line_chooses_the_aggregator_by_class_path_or_name(tj: ModuleType) -> None:
    base = ["--model", "MultiObjective", "--data", "SyntheticMultimodal"]
    rule = ["--model.rule", "mmlearn.gradients.TorchJD"]
    forms = {
        "class path": ([*rule, "--model.rule.aggregator", "torchjd.aggregation.PCGrad"], tj.PCGrad),
        "name": ([*rule, "--model.rule.aggregator", "PCGrad"], tj.PCGrad),
        "init args": (
            [
                *rule,
                "--model.rule.aggregator",
                "{class_path: torchjd.aggregation.MGDA, init_args: {epsilon: 0.01}}",
            ],
            tj.MGDA,
        ),
        "inline": (
            [
                '--model.rule={"class_path": "TorchJD", "init_args": {"scope": "shared", '
                '"aggregator": {"class_path": "torchjd.aggregation.TrimmedMean", '
                '"init_args": {"trim_number": 1}}}}'
            ],
            tj.TrimmedMean,
        ),
    }
    for form, (args, cls) in forms.items():
        built = build_cli([*base, *args], run=False).model.rule
        assert isinstance(built, TorchJD) and type(built.aggregator) is cls, form
    tuned = build_cli([*base, *forms["init args"][0]], run=False).model.rule
    assert tuned.aggregator.epsilon == 0.01


def test_the_command_line_names_an_unknown_aggregator(tj: ModuleType, capsys, tmp_path) -> None:
    args = ["fit", "--model", "MultiObjective", "--data", "SyntheticMultimodal"]
    args += ["--model.rule", "mmlearn.gradients.TorchJD", "--model.rule.aggregator", "UPGard"]
    with pytest.raises(SystemExit) as exc:
        main([*args, f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "TorchJD: unknown aggregator 'UPGard'; expected one of [" in err and "'UPGrad'" in err


def test_a_config_spec_without_torchjd_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the spec a shipped config writes is built by the rule, not by the CLI: without torchjd it
    # is the install command, not a type error about the value
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)  # import raises ImportError
    with pytest.raises(MMLearnError, match=r"torchjd library is not installed.*pip install"):
        TorchJD(aggregator={"class_path": "torchjd.aggregation.UPGrad"})


def test_a_spec_with_init_args_builds_the_aggregator_with_them(tj: ModuleType) -> None:
    rule = TorchJD(
        {"class_path": "torchjd.aggregation.TrimmedMean", "init_args": {"trim_number": 1}}
    )
    assert type(rule.aggregator) is tj.TrimmedMean and rule.aggregator.trim_number == 1
    with pytest.raises(MMLearnError, match=r"^TorchJD: UPGrad refuses init_args \{'nope': 1\}"):
        TorchJD({"class_path": "torchjd.aggregation.UPGrad", "init_args": {"nope": 1}})
    with pytest.raises(MMLearnError, match=r"expected a name or \{class_path"):
        TorchJD({"init_args": {"c": 0.5}})
