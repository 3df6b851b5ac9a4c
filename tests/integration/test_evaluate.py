"""``mmlearn evaluate`` and :func:`mmlearn.evaluation.evaluate.evaluate` on data whose answer we
know: which modality carries the label, what the training mean is, what a trained encoder adds.

The reference numbers are computed here independently of the one-pass engine (the strategy's
own forward pass on inputs where the absent modalities are replaced, hand-written NLL and
accuracy), so a wrong feature cache, fill or subset would show.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import Given, quiet_trainer
from mmlearn.cli import main
from mmlearn.data import SyntheticMultimodal
from mmlearn.data.base import Split
from mmlearn.evaluation.evaluate import evaluate
from mmlearn.strategies import I2M2, InterOnly, IntraOnly

#: three modalities of decreasing quality: the label is in each alone (intra), noise grows
NOISY = dict(num_modalities=3, intra=1.0, noise=[0.5, 2.0, 5.0], num_classes=4, dim=16)
SMALL = dict(n_train=600, n_val=100, n_test=400, batch_size=100, seed=0)


def trained(cls: type, dm: SyntheticMultimodal, epochs: int = 4, **kw: object):
    torch.manual_seed(0)
    dm.setup("fit")
    model = cls(input_shapes=dm.input_shapes, num_classes=dm.num_classes, **kw)
    quiet_trainer(max_epochs=epochs).fit(model, datamodule=dm)
    return model


@pytest.fixture(scope="module")
def noisy_inter_only() -> tuple[InterOnly, SyntheticMultimodal]:
    dm = SyntheticMultimodal(**NOISY, **SMALL)
    return trained(InterOnly, dm, embed_dim=32), dm


def test_shapley_values_rank_the_modalities_by_their_noise(noisy_inter_only) -> None:
    model, dm = noisy_inter_only
    result = evaluate(model, dm, probes=False)
    assert set(result.shapley) == {"impute_mean", "impute_zero", "feature_zero"}  # no drop
    for semantics, phi in result.shapley.items():
        assert phi["m0"] > phi["m1"] > phi["m2"], (semantics, phi)
        # efficiency, exactly: the values share out v(all) - v(empty)
        total = result.full()["acc"] - result.prior["acc"]
        assert math.isclose(sum(phi.values()), total, abs_tol=1e-9)
    # a 3-modality model: 7 subsets per semantics, drop marked as impossible for InterOnly
    for s in ("impute_mean", "impute_zero", "feature_zero", "drop"):
        assert len([r for r in result.rows if r["semantics"] == s]) == 7
    drop = [r for r in result.rows if r["semantics"] == "drop"]
    assert all("not available" in r["note"] and "acc" not in r for r in drop)


def test_the_empty_set_is_the_training_class_prior(noisy_inter_only) -> None:
    model, dm = noisy_inter_only
    result = evaluate(model, dm, probes=False, missing=["impute_zero"])
    freq = torch.bincount(dm.splits["train"].target, minlength=4).double()
    freq /= freq.sum()
    y = dm.splits["test"].target
    assert math.isclose(result.prior["nll"], float(-freq.log()[y].mean()), rel_tol=1e-5)
    majority = float((y == freq.argmax()).double().mean())
    assert math.isclose(result.prior["acc"], majority, rel_tol=1e-6)


def test_impute_mean_uses_the_training_mean_far_from_zero() -> None:
    g = torch.Generator().manual_seed(3)

    def split(n: int) -> Split:
        y = torch.randint(0, 3, (n,), generator=g)
        a = 5.0 + torch.randn(n, 4, generator=g) + y[:, None].float()  # mean far from 0
        b = torch.randn(n, 2, generator=g) - y[:, None].float()
        return Split({"a": a, "b": b}, y)

    splits = {"train": split(300), "val": split(30), "test": split(90)}
    dm = Given(splits, k=3, batch_size=32)
    torch.manual_seed(0)
    model = InterOnly(input_shapes={"a": [4], "b": [2]}, num_classes=3).eval()
    result = evaluate(model, dm, probes=False, missing=["impute_mean", "impute_zero"])
    mean_a = splits["train"].inputs["a"].mean(0)
    assert float(mean_a.mean()) > 5.5  # the test is about a mean that is not zero
    test = splits["test"]
    for semantics, fill in (("impute_mean", mean_a), ("impute_zero", torch.zeros(4))):
        with torch.no_grad():
            inputs = {"a": fill.expand(90, 4), "b": test.inputs["b"]}
            lp = model.predict_log_proba(model(inputs))
        row = result.row(semantics, ["b"])
        nll = float(-lp[torch.arange(90), test.target].mean())
        assert math.isclose(row["nll"], nll, rel_tol=1e-5)
        assert math.isclose(row["acc"], float((lp.argmax(1) == test.target).float().mean()))
    assert result.row("impute_mean", ["b"])["nll"] != result.row("impute_zero", ["b"])["nll"]
    assert "computed now from the training split" in result.means_source


def test_a_probe_of_a_trained_encoder_beats_one_of_a_random_encoder() -> None:
    dm = SyntheticMultimodal(
        num_modalities=2, intra=1.0, noise=[1.0, 1.0], num_classes=4, dim=32, **SMALL
    )
    options = dict(embed_dim=3, encoders={m: {"name": "mlp", "hidden": [16]} for m in ("m0", "m1")})
    model = trained(IntraOnly, dm, epochs=8, mode="independent", **options)
    torch.manual_seed(1)
    fresh = IntraOnly(input_shapes=dm.input_shapes, num_classes=4, mode="independent", **options)
    probe = {p["encoder"]: p["probe_acc"] for p in evaluate(model, dm).probes}
    random = {p["encoder"]: p["probe_acc"] for p in evaluate(fresh, dm).probes}
    for name in probe:
        assert probe[name] > random[name] + 0.05, (probe, random)
    # with unimodal experts, each probe sits next to its expert's head accuracy
    heads = {p["encoder"]: p["head_acc"] for p in evaluate(model, dm).probes}
    assert all(0.25 < h <= 1 for h in heads.values())


# ---- the command ------------------------------------------------------------------------------
RUN_DATA = [
    "--data",
    "SyntheticMultimodal",
    "--data.num_modalities=3",
    "--data.noise=[0.2, 1.2, 3.0]",
    "--data.num_classes=4",
    "--data.n_train=300",
    "--data.n_val=60",
    "--data.n_test=120",
    "--data.batch_size=60",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def i2m2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    args = ["fit", "--model", "I2M2", *RUN_DATA, "--trainer.max_epochs=2", *QUIET]
    with no_leaked_seed():
        main([*args, "--seed_everything=0", f"--trainer.default_root_dir={root}"])
    (run,) = root.glob("SyntheticMultimodal/I2M2/version_*")
    return run


@contextlib.contextmanager
def no_leaked_seed() -> Iterator[None]:
    """Neither see nor leave ``PL_GLOBAL_SEED``: a module-scoped fixture runs before the
    function-scoped fixture of conftest.py that clears it, after other modules' runs set it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PL_GLOBAL_SEED", "0")  # records "unset" as what to restore
        mp.delenv("PL_GLOBAL_SEED")
        yield


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_command_and_the_api_give_the_same_numbers(i2m2_run: Path, capsys) -> None:
    ckpt = i2m2_run / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--ckpt_path", str(ckpt)])
    assert done.value.code == 0
    out = i2m2_run / "evaluate" / "last"
    saved = json.loads((out / "evaluation.json").read_text())
    assert "stored with the run" in saved["impute_mean_source"]
    assert {p.name for p in out.iterdir()} >= {"missing.csv", "reliability.png", "summary.md"}
    assert "evaluation written to" in capsys.readouterr().out

    model = I2M2.load_from_checkpoint(ckpt, map_location="cpu")
    dm = SyntheticMultimodal(
        num_modalities=3,
        noise=[0.2, 1.2, 3.0],
        num_classes=4,
        n_train=300,
        n_val=60,
        n_test=120,
        batch_size=60,
        seed=0,
    )
    api = evaluate(model, dm)
    assert len(saved["missing"]) == len(api.rows) == 4 * 7
    for theirs, ours in zip(saved["missing"], api.rows, strict=True):
        assert theirs.keys() == ours.keys()
        for k, v in ours.items():
            if isinstance(v, float):
                assert math.isclose(theirs[k], v, rel_tol=1e-6, abs_tol=1e-7), (k, theirs, ours)
            else:
                assert theirs[k] == v
    assert saved["shapley"].keys() == api.shapley.keys()
    for semantics, phi in api.shapley.items():
        assert saved["shapley"][semantics] == pytest.approx(phi, abs=1e-7)
    assert [p["probe_acc"] for p in saved["probes"]] == pytest.approx(
        [p["probe_acc"] for p in api.probes], abs=1e-6
    )


BAD = [
    (["--subsets=[m0+zz]"], ["--subsets", "m0+zz", "'zz'", "['m0', 'm1', 'm2']"]),
    (["--subsets=['']"], ["--subsets", "empty"]),
    (["--subsets=[m0+]"], ["--subsets", "'m0+'", "empty modality name"]),
    (["--metric=auroc"], ["--metric auroc", "binary and multi-label", "4 classes"]),
    (
        ["--subsets=m0", "--missing=drop"],
        ["--out", "holds an evaluation with other", "--overwrite"],
    ),
    (["--out={run}/config.yaml"], ["--out", "not a folder"]),
    (["--missing=[impute]"], ["--missing", "'impute'", "impute_mean"]),
    (["--metric=auc"], ["--metric", "'auc'", "acc"]),
    (["--data.num_modalities=2", "--data.noise=0.5"], ["--ckpt_path", "modality mismatch"]),
    (["--data.num_classes=3"], ["--ckpt_path", "4 classes", "3"]),
]


@pytest.mark.parametrize("extra, expect", BAD, ids=[b[1][1][:24] for b in BAD])
def test_bad_input_is_one_line_and_nothing_is_lost(
    i2m2_run: Path, extra: list[str], expect: list[str], capsys
) -> None:
    ckpt = i2m2_run / "checkpoints" / "last.ckpt"
    assert (i2m2_run / "evaluate" / "last" / "evaluation.json").is_file()  # the CLI=API test's
    before = digest(i2m2_run)
    extra = [e.replace("{run}", str(i2m2_run)) for e in extra]
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--ckpt_path", str(ckpt), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmlearn: error:"), err
    for text in expect:
        assert text in err[0], err[0]
    assert digest(i2m2_run) == before


def test_a_semantics_the_strategy_cannot_do_is_refused_by_name(tmp_path: Path, capsys) -> None:
    args = ["fit", "--model", "InterOnly", *RUN_DATA, "--trainer.max_epochs=1", *QUIET]
    main([*args, f"--trainer.default_root_dir={tmp_path}"])
    (ckpt,) = tmp_path.glob("SyntheticMultimodal/InterOnly/version_0/checkpoints/last.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--ckpt_path", str(ckpt), "--missing=[drop]"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--missing drop" in err and "InterOnly" in err and "impute_mean" in err


def test_options_without_brackets_and_the_same_evaluation_again(i2m2_run: Path, capsys) -> None:
    ckpt = i2m2_run / "checkpoints" / "last.ckpt"
    out = i2m2_run / "evaluate" / "mine"
    args = ["evaluate", "--ckpt_path", str(ckpt), "--out", str(out), "--probes=false"]
    for _ in range(2):  # the same options and data: the same result, replaced
        with pytest.raises(SystemExit) as done:
            main([*args, "--subsets", "m0,m1+m2", "--missing", "impute_zero"])
        assert done.value.code == 0
    saved = json.loads((out / "evaluation.json").read_text())
    assert [(r["semantics"], r["subset"]) for r in saved["missing"]] == [
        ("impute_zero", "m0"),
        ("impute_zero", "m1+m2"),
        ("impute_zero", "m0+m1+m2"),
    ]
    assert saved["data_config"]["init_args"]["num_modalities"] == 3
    assert saved["evaluate_options"]["subsets"] == ["m0", "m1+m2"]
    shown = capsys.readouterr().out
    assert "Shapley values: not computed: they need every subset (7); 3 were evaluated" in shown
