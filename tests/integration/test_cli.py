"""Real LightningCLI runs: every shipped config, reproducibility, resume, checkpoints, errors."""

from __future__ import annotations

import csv
import hashlib
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from helpers import STRATEGY_ARGS  # noqa: I001  (tests/helpers.py)
from mmlearn.cli import build_cli, main
from mmlearn.data.fixtures import write_av_clips, write_avmnist, write_image_text, write_mimic
from mmlearn.strategies import I2M2, EMAMoments, InterOnly, IntraOnly, LastLayer, Microbatch

REPO = Path(__file__).resolve().parents[2]
# run configs only: W&B sweep files, the W&B base fragment and sbatch scripts have their own tests
EXPERIMENTS = sorted(
    p for p in (REPO / "experiments").glob("*/*.yaml") if p.parent.name not in {"sweeps", "_base"}
)
DATA_MODULES = sorted((REPO / "data_modules").glob("*.yaml"))
SMALL_CLIPS = ["--data.image_size=32", "--data.num_workers=0", "--data.prepare_workers=0"]
FIXTURES = {
    "avmnist.yaml": (write_avmnist, ["--data.val_size=30"]),
    "mimic.yaml": (write_mimic, []),
    "crema_d.yaml": (write_av_clips, SMALL_CLIPS),
    "kinetics_sounds.yaml": (partial(write_av_clips, name="kinetics-sounds"), SMALL_CLIPS),
    "image_text.yaml": (
        write_image_text,
        [
            "--data.image_size=24",
            "--data.num_workers=0",
            "--data.prepare_workers=0",
            "--data.val_fraction=0.25",
            '--model.encoders={"text": {"name": "hf", "pretrained": "minilm"}}',
        ],
    ),
}
SYN = [
    "--data",
    "SyntheticMultimodal",
    "--data.n_train=256",
    "--data.n_val=64",
    "--data.n_test=128",
]


@pytest.fixture
def mfeat_env(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.setenv("MMLEARN_DATA", str(request.getfixturevalue("mfeat_root")))


def test_every_experiment_config_runs_fast_dev_run(run_cli, request) -> None:
    assert EXPERIMENTS, "no experiment configs found"
    for path in EXPERIMENTS:
        if "mfeat" in path.parts:
            request.getfixturevalue("mfeat_env")
        if "fashion_mnist" in path.parts:
            request.getfixturevalue("fashion_dir")
        cli = run_cli("fit", "--config", str(path), "--trainer.fast_dev_run=true")
        assert cli.trainer.state.finished, path
        assert torch.isfinite(cli.trainer.callback_metrics["train/loss"]), path


@pytest.mark.parametrize("path", DATA_MODULES, ids=lambda p: p.name)
def test_every_data_module_config_runs_fast_dev_run(
    path: Path, run_cli, request, monkeypatch
) -> None:
    monkeypatch.chdir(REPO)  # example files are named relative to the repository root
    if "mfeat" in path.name:
        request.getfixturevalue("mfeat_env")
    if "fashion" in path.name:
        request.getfixturevalue("fashion_dir")
    extra: list[str] = []
    if path.name in FIXTURES:  # data nobody may redistribute: its layout in miniature
        write, extra = FIXTURES[path.name]
        root = request.getfixturevalue("tmp_path") / "fixture-data"
        write(root)
        monkeypatch.setenv("MMLEARN_DATA", str(root))
    cli = run_cli(
        "fit", "--model", "I2M2", "--data", str(path), *extra, "--trainer.fast_dev_run=true"
    )
    # one real optimisation step on that data (fast_dev_run: one training batch), finite loss
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def _fit(
    run_cli, model: str | list[str], *extra: str, epochs: int = 3, save_dir: Path | None = None
):
    """``mmlearn fit`` on synthetic data; ``model`` a strategy name or the arguments choosing it."""
    choose = ["--model", model] if isinstance(model, str) else model
    args = ["fit", *choose, *SYN, f"--trainer.max_epochs={epochs}", "--seed_everything=7"]
    return run_cli(*args, *extra, save_dir=save_dir)


def test_run_dir_holds_config_and_checkpoints_and_test_reproduces(run_cli) -> None:
    cli = _fit(run_cli, "I2M2")
    run = Path(cli.trainer.log_dir)
    assert run.parts[-3:-1] == ("SyntheticMultimodal", "I2M2")
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert best.parent == run / "checkpoints" and best.name.startswith("best-")
    fit_metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")[0]
    again = run_cli("test", "--config", str(run / "config.yaml"), "--ckpt_path", str(best))
    metrics = {k: float(v) for k, v in again.trainer.callback_metrics.items()}
    for key in ("test/acc", "test/f1", "test/acc/m0", "test/acc/m1", "test/loss"):
        assert metrics[key] == pytest.approx(fit_metrics[key], abs=1e-7), key
    assert Path(again.trainer.log_dir) != run  # the test run logs to RUN/test, inside the run
    pred = run_cli("predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(best))
    rows = list(csv.DictReader(open(Path(pred.trainer.log_dir) / "predictions.csv")))
    assert len(rows) == 128
    acc = sum(r["pred"] == r["target"] for r in rows) / len(rows)
    assert acc == pytest.approx(fit_metrics["test/acc"], abs=1e-6)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_twice_gives_identical_metrics_and_weights(run_cli) -> None:
    a = _fit(run_cli, "InterOnly", epochs=2)
    b = _fit(run_cli, "InterOnly", epochs=2)
    c = _fit(run_cli, "InterOnly", "--seed_everything=8", epochs=2)
    wa, wb, wc = _weights(a.model), _weights(b.model), _weights(c.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    for key in ("val/acc", "val/loss", "train/loss_epoch"):
        assert float(a.trainer.callback_metrics[key]) == float(b.trainer.callback_metrics[key])


# every strategy (BOGC: EMAMoments, whose moments are buffers of the state dict), and weights
# reused across the checkpoint: 4 steps an epoch, so the resumed step 8 (8 % 3 != 0) must re-apply
# the weights of step 6, saved as the checkpoint's cached_weights
RESUME = STRATEGY_ARGS | {
    "BOGC-ema-every3": [
        *["--model", "BOGC", "--model.moments=EMAMoments", "--model.moments.beta=0.5"],
        "--model.every=3",
    ],
    "MGDA-every3": [*STRATEGY_ARGS["MGDA"], "--model.every=3"],
}


@pytest.mark.parametrize("model", RESUME.values(), ids=list(RESUME))
def test_resume_from_last_ckpt_equals_uninterrupted(run_cli, tmp_path: Path, model) -> None:
    full = _fit(run_cli, model, epochs=4, save_dir=tmp_path / "full")
    half = _fit(run_cli, model, epochs=2, save_dir=tmp_path / "half")
    last = Path(half.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = _fit(run_cli, model, "--ckpt_path", str(last), epochs=4, save_dir=tmp_path / "res")
    assert resumed.trainer.current_epoch == 4
    wf, wr, wh = _weights(full.model), _weights(resumed.model), _weights(half.model)
    assert wf.keys() == wr.keys()
    for k in wf:
        assert torch.allclose(wf[k], wr[k], atol=1e-6, rtol=0), k
    assert not all(torch.allclose(wf[k], wh[k]) for k in wf)  # the second half did train
    saved = torch.load(last, weights_only=False)
    if isinstance(getattr(full.model, "moments", None), EMAMoments):
        assert float(saved["state_dict"]["moments.weight"]) > 1  # the EMA state is checkpointed
    if getattr(full.model, "every", 1) > 1:
        assert saved["cached_weights"].keys() == {g.name for g in full.model.groups}


MICROBATCH = "mmlearn.strategies.moments.Microbatch"


def test_the_moments_estimator_is_chosen_on_the_command_line(run_cli) -> None:
    choose = ["--model", "BOGC", "--model.moments=Microbatch", "--model.moments.n_chunks=2"]
    cli = _fit(run_cli, choose, epochs=1)
    assert cli.trainer.state.finished and cli.trainer.global_step == 4
    assert isinstance(cli.model.moments, Microbatch) and cli.model.moments.n_chunks == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    run = Path(cli.trainer.log_dir)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    moments = saved["model"]["init_args"]["moments"]
    assert moments["class_path"] in ("mmlearn.strategies.Microbatch", MICROBATCH)
    assert moments["init_args"] == {"n_chunks": 2}
    # the run's config rebuilds the same estimator
    last = run / "checkpoints" / "last.ckpt"
    again = run_cli("test", "--config", str(run / "config.yaml"), "--ckpt_path", str(last))
    assert isinstance(again.model.moments, Microbatch) and again.model.moments.n_chunks == 2
    # the other spellings jsonargparse accepts, and an override of a shipped config
    base = ["--model", "BOGC", "--data", "SyntheticMultimodal"]
    shipped = ["--config", str(REPO / "experiments/synthetic/bogc.yaml")]
    forms = {
        "full": [
            *base,
            f"--model.init_args.moments={MICROBATCH}",
            "--model.init_args.moments.init_args.n_chunks=2",
        ],
        "separate": [*base, "--model.moments", "Microbatch", "--model.moments.n_chunks", "2"],
        "inline": [
            *base,
            '--model.moments={"class_path": "Microbatch", "init_args": {"n_chunks": 2}}',
        ],
        "config": [*shipped, "--model.moments=Microbatch", "--model.moments.n_chunks=2"],
    }
    for form, args in forms.items():
        model = build_cli(args, run=False).model
        assert isinstance(model.moments, Microbatch) and model.moments.n_chunks == 2, form
    model = build_cli([*shipped, "--model.moments=LastLayer"], run=False).model
    assert isinstance(model.moments, LastLayer)  # EMAMoments' beta of the file is dropped
    model = build_cli([*shipped, "--model.moments.beta=0.5"], run=False).model
    assert isinstance(model.moments, EMAMoments) and model.moments.beta == 0.5


def test_i2m2_init_from_loads_the_experts(run_cli, tmp_path: Path) -> None:
    inter = _fit(run_cli, "InterOnly", epochs=1)
    intra = _fit(run_cli, "IntraOnly", epochs=1)
    ckpt = {
        "inter": str(Path(inter.trainer.log_dir) / "checkpoints" / "last.ckpt"),
        "intra": str(Path(intra.trainer.log_dir) / "checkpoints" / "last.ckpt"),
    }
    shapes, k = inter.datamodule.input_shapes, inter.datamodule.num_classes
    model = I2M2(
        input_shapes=shapes, num_classes=k, init_from={"joint": ckpt["inter"], "m1": ckpt["intra"]}
    )
    assert isinstance(inter.model, InterOnly) and isinstance(intra.model, IntraOnly)
    for name, p in inter.model.joint.state_dict().items():
        assert torch.equal(model.joint.state_dict()[name], p), name
    for name, p in intra.model.experts["m1"].state_dict().items():
        assert torch.equal(model.experts["m1"].state_dict()[name], p), name
    fresh = I2M2(input_shapes=shapes, num_classes=k)
    assert not torch.equal(model.experts["m0"].head.weight, intra.model.experts["m0"].head.weight)
    # without init_from the joint model is not the checkpoint's: the equality above is the load
    assert not torch.equal(fresh.joint.head[0].weight, inter.model.joint.head[0].weight)
    with pytest.raises(ValueError, match=r"has no weights under 'experts.m0.'"):
        I2M2(input_shapes=shapes, num_classes=k, init_from={"m0": ckpt["inter"]})
    with pytest.raises(ValueError, match=r"unknown key 'audio'"):
        I2M2(input_shapes=shapes, num_classes=k, init_from={"audio": ckpt["inter"]})
    # through the CLI
    cli = _fit(run_cli, "I2M2", f"--model.init_from={{joint: {ckpt['inter']}}}", epochs=1)
    assert cli.trainer.state.finished


def _user_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_cli_errors_name_the_bad_value(capsys, tmp_path: Path, mfeat_env) -> None:
    save = f"--trainer.logger.init_args.save_dir={tmp_path}"
    err = _user_error(capsys, ["fit", "--model", "Fusionator", *SYN, save])
    assert "unknown strategy 'Fusionator' (from --model)" in err and "'I2M2'" in err
    err = _user_error(capsys, ["fit", "--model", "I2M2", "--data", "Imagenet", save])
    assert "unknown data module 'Imagenet'" in err and "'MultipleFeatures'" in err
    err = _user_error(capsys, ["fit", "--model", "I2M2", *SYN, "--model.fusion=film", save])
    assert "unknown fusion 'film'" in err
    err = _user_error(
        capsys, ["fit", "--model", "I2M2", *SYN, "--model.encoders={audio: {name: mlp}}", save]
    )
    assert "modalities ['audio'] that the data does not have" in err and "['m0', 'm1']" in err
    err = _user_error(
        capsys, ["fit", "--model", "I2M2", *SYN, "--model.encoders={m0: {name: gru}}", save]
    )
    assert "model.encoders.m0: encoder 'gru' takes inputs of rank (2,)" in err
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("model: Transformerz\ndata: SyntheticMultimodal\n")
    err = _user_error(capsys, ["fit", "--config", str(bad_cfg), save])
    assert f"unknown strategy 'Transformerz' (from {bad_cfg}, key 'model')" in err


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_modality_mismatch_with_a_checkpoint_loses_nothing(run_cli, capsys, tmp_path, mfeat_env):
    views = "--data.views=[fou, mor]"
    cli = run_cli(
        "fit",
        "--model",
        "InterOnly",
        "--data",
        "MultipleFeatures",
        views,
        "--trainer.max_epochs=1",
        save_dir=tmp_path,
    )
    run = Path(cli.trainer.log_dir)
    before = _digest(run)
    ckpt = run / "checkpoints" / "last.ckpt"
    # same model, other views: the data has a modality the model does not know and vice versa
    err = _user_error(
        capsys,
        [
            "test",
            "--config",
            str(run / "config.yaml"),
            "--ckpt_path",
            str(ckpt),
            "--data.views=[fou, zer]",
        ],
    )
    assert "modality mismatch" in err and "['fou', 'zer']" in err and "['fou', 'mor']" in err
    assert "missing in the model: ['zer']" in err and "unknown to the data: ['mor']" in err
    # a run that would overwrite the existing run directory is refused; nothing is lost
    with pytest.raises(RuntimeError, match="config.yaml"):
        run_cli(
            "fit",
            "--config",
            str(run / "config.yaml"),
            f"--trainer.logger.init_args.version={run.name}",
            save_dir=tmp_path,
        )
    assert _digest(run) == before


def test_last_ckpt_is_the_final_state_even_when_val_did_not_improve(run_cli) -> None:
    # lr 0: val/acc never improves after epoch 0, so Lightning alone would keep last.ckpt there
    cli = _fit(run_cli, "InterOnly", "--model.init_args.optimizer.init_args.lr=0.0", epochs=3)
    ckpts = Path(cli.trainer.checkpoint_callback.dirpath)
    assert (ckpts / "best-epoch=0.ckpt").is_file()
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, cli.trainer.global_step)
