"""ImbalanceMonitor: per-encoder probes, gradient norms and cosines, checked by hand."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from helpers import instantiate, quiet_trainer, spec  # noqa: I001  (tests/helpers.py)
from mmlearn.callbacks import ImbalanceMonitor
from mmlearn.cli import main
from mmlearn.data import SyntheticMultimodal
from mmlearn.errors import MMLearnError
from mmlearn.evaluation.probes import fit_probe
from mmlearn.strategies import InterOnly, LateFusionHeads, MultiObjective
from mmlearn.strategies.base import MultimodalModule

# data_modules/synthetic_imbalanced.yaml: m0 strong, m1 weak
IMBALANCED: dict[str, Any] = {
    "num_modalities": 2,
    "dim": 16,
    "num_classes": 4,
    "intra": [1.0, 0.4],
    "inter": 0.0,
    "noise": [0.3, 1.5],
    "batch_size": 64,
}
SUM = ("MultiObjective", {"rule": spec("mmlearn.gradients.Sum")})
STRATEGIES = {
    "InterOnly": InterOnly,
    "LateFusionHeads": LateFusionHeads,
    "MultiObjective": MultiObjective,
}


def _data(**kw: Any) -> SyntheticMultimodal:
    dm = SyntheticMultimodal(**(IMBALANCED | {"n_train": 512, "n_val": 256, "seed": 0} | kw))
    dm.setup("fit")
    return dm


def _model(name: str, dm: SyntheticMultimodal, **kw: Any) -> MultimodalModule:
    options = instantiate(SUM[1]) if name == "MultiObjective" else {}
    return STRATEGIES[name](
        input_shapes=dm.input_shapes, num_classes=dm.num_classes, embed_dim=32, **options, **kw
    )


def _columns(path: Path) -> dict[str, list[float]]:
    """metrics.csv as column -> its non-empty values, in row order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r[k] not in ("", None)] for k in rows[0]}


class ModeSpy(pl.Callback):
    """After the monitor's epoch end: the modes of every submodule, and the model's grads."""

    def __init__(self) -> None:
        self.modes: list[list[bool]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.modes.append([m.training for m in pl_module.modules()])


@pytest.mark.parametrize("name", ["InterOnly", "LateFusionHeads"])
def test_every_key_lands_in_metrics_csv_once_per_epoch_and_the_strong_modality_probes_higher(
    tmp_path: Path, name: str
) -> None:
    pl.seed_everything(0)
    dm = _data()
    model = _model(name, dm)
    monitor, spy = ImbalanceMonitor(train_samples=400, val_samples=200, seed=3), ModeSpy()
    epochs = 3
    trainer = quiet_trainer(max_epochs=epochs, logger=CSVLogger(tmp_path), callbacks=[monitor, spy])
    trainer.fit(model, datamodule=dm)
    cols = _columns(Path(trainer.log_dir) / "metrics.csv")
    encoders = ["joint.m0", "joint.m1"]
    want = [f"monitor/probe/{e}" for e in encoders] + [f"monitor/grad_norm/{e}" for e in encoders]
    cos = ["monitor/cos/m0", "monitor/cos/m1"]
    if name == "LateFusionHeads":
        want += cos
    assert sorted(k for k in cols if k.startswith("monitor/")) == sorted(want)
    for key in want:
        assert len(cols[key]) == epochs, key  # one value per epoch
    for e in encoders:
        assert all(0 <= v <= 1 for v in cols[f"monitor/probe/{e}"])
        assert all(v > 0 for v in cols[f"monitor/grad_norm/{e}"])
    strong, weak = cols["monitor/probe/joint.m0"], cols["monitor/probe/joint.m1"]
    assert all(s > w + 0.1 for s, w in zip(strong, weak, strict=True)), (strong, weak)
    if name == "LateFusionHeads":
        assert all(-1 <= v <= 1 for k in cos for v in cols[k])
    # the model was put back in train mode (every submodule) before the next epoch
    assert spy.modes == [[True] * len(spy.modes[0])] * epochs

    # the subsets: fixed by the seed, the sizes asked for, distinct samples of their split
    again = ImbalanceMonitor(train_samples=400, val_samples=200, seed=3)
    again.setup(trainer, model, "fit")
    other = ImbalanceMonitor(train_samples=400, val_samples=200, seed=4)
    other.setup(trainer, model, "fit")
    for split, n, size in (("train", 512, 400), ("val", 256, 200)):
        index = monitor.indices[split]
        assert len(index) == len(index.unique()) == size and 0 <= int(index.min())
        assert int(index.max()) < n
        assert torch.equal(again.indices[split], index)
        assert not torch.equal(other.indices[split], index)

    # the last epoch's probe, by hand: the final encoders in eval mode on the same subsets
    model.eval()
    with torch.no_grad():
        feats = {
            s: model.encode({m: x[monitor.indices[s]] for m, x in dm.splits[s].inputs.items()})
            for s in ("train", "val")
        }
    targets = {s: dm.splits[s].target[monitor.indices[s]] for s in ("train", "val")}
    for e in encoders:
        probe = fit_probe(feats["train"][e], targets["train"], dm.num_classes)
        acc = probe.accuracy(feats["val"][e], targets["val"])
        assert cols[f"monitor/probe/{e}"][-1] == pytest.approx(acc, abs=1e-6), e


def _hand_grad_norms(model: MultimodalModule, dm: SyntheticMultimodal) -> dict[str, float]:
    """The encoders' gradient norms of the strategy's total loss on the whole training split."""
    model = copy.deepcopy(model).train()
    split = dm.splits["train"]
    losses = model.objectives(model(split.inputs), split.target)
    sum(losses.values()).backward()  # type: ignore[union-attr]
    return {
        name: float(torch.cat([p.grad.flatten() for p in enc.parameters()]).norm())
        for name, (_, enc) in model.feature_encoders().items()
    }


@pytest.mark.parametrize("name", ["InterOnly", "LateFusionHeads", "MultiObjective"])
def test_a_one_step_epoch_logs_the_gradient_norm_computed_by_hand(name: str) -> None:
    dm = _data(n_train=128, batch_size=128)  # one batch covers the training split
    model = _model(name, dm)
    want = _hand_grad_norms(model, dm)
    trainer = quiet_trainer(callbacks=[ImbalanceMonitor(train_samples=64, val_samples=64)])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1
    assert model.automatic_optimization == (name != "MultiObjective")
    for encoder, norm in want.items():
        got = float(trainer.callback_metrics[f"monitor/grad_norm/{encoder}"])
        assert got == pytest.approx(norm, rel=1e-5), encoder


class GradCapture(pl.Callback):
    """The encoders' ``.grad`` norms after every training batch (before the next zero_grad)."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.norms.append(
            {
                name: float(torch.cat([p.grad.flatten() for p in enc.parameters()]).norm())
                for name, (_, enc) in pl_module.feature_encoders().items()
            }
        )


@pytest.mark.parametrize("name", ["LateFusionHeads", "MultiObjective"])
def test_the_gradient_norm_is_the_mean_over_the_epochs_steps_automatic_or_manual(
    name: str,
) -> None:
    dm = _data(n_train=320, batch_size=64)  # 5 steps an epoch
    model = _model(name, dm)
    capture = GradCapture()
    per_epoch: list[dict[str, float]] = []

    class EpochMetrics(pl.Callback):  # after the monitor's epoch end: what it logged
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            metrics = trainer.callback_metrics
            per_epoch.append({k: float(v) for k, v in metrics.items() if "grad_norm" in k})

    monitor = ImbalanceMonitor(train_samples=64, val_samples=64)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor, capture, EpochMetrics()])
    trainer.fit(model, datamodule=dm)
    assert len(capture.norms) == 10 and len(per_epoch) == 2
    for epoch in range(2):
        steps = capture.norms[5 * epoch : 5 * epoch + 5]
        for encoder in steps[0]:
            mean = sum(s[encoder] for s in steps) / 5
            got = per_epoch[epoch][f"monitor/grad_norm/{encoder}"]
            assert got == pytest.approx(mean, rel=1e-5), (epoch, encoder)


def test_the_cosine_is_that_of_the_fused_and_unimodal_gradients_on_the_fixed_batch() -> None:
    pl.seed_everything(0)
    dm = _data(batch_size=32)
    # dropout in the fused head: the measurement is in eval mode (no dropout, no random draw)
    model = _model("LateFusionHeads", dm, dropout=0.3)
    monitor = ImbalanceMonitor(train_samples=200, val_samples=100)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor])
    trainer.fit(model, datamodule=dm)
    rows = monitor.indices["train"][:32]  # the first data.batch_size samples of the subset
    split = dm.splits["train"]
    inputs, target = {m: x[rows] for m, x in split.inputs.items()}, split.target[rows]
    for m in dm.modalities:
        grads = []
        for objective in ("fused", m):  # two separate backward passes into .grad
            copied = copy.deepcopy(model).eval()
            copied.zero_grad()
            copied.objectives(copied(inputs), target)[objective].backward()
            enc = copied.joint.encoders[m]
            grads.append(torch.cat([p.grad.flatten() for p in enc.parameters()]))
        want = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
        got = float(trainer.callback_metrics[f"monitor/cos/{m}"])
        assert got == pytest.approx(float(want), abs=1e-5), m
        assert abs(got) < 1 - 1e-3  # two different gradients, not one compared with itself


def test_the_monitor_leaves_training_unchanged() -> None:
    """No random draw, no buffer or gradient touched: the same weights with or without it."""
    weights = []
    for callbacks in ([], [ImbalanceMonitor(train_samples=200, val_samples=100)]):
        pl.seed_everything(1)
        dm = _data(n_train=256)
        model = _model("LateFusionHeads", dm, dropout=0.3)
        quiet_trainer(max_epochs=2, callbacks=callbacks).fit(model, datamodule=dm)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_samples": 0}, "ImbalanceMonitor: train_samples=0; expected an integer >= 1"),
        ({"val_samples": -1}, "ImbalanceMonitor: val_samples=-1; expected an integer >= 1"),
        ({"train_samples": 1.5}, "train_samples=1.5"),
        ({"seed": "x"}, "seed='x'"),
    ],
)
def test_bad_options_name_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(MMLearnError, match=message.replace("(", r"\(")):
        ImbalanceMonitor(**options)


def test_data_without_splits_is_refused_clearly() -> None:
    dm = _data(n_train=64)
    model = _model("InterOnly", dm)
    trainer = quiet_trainer(callbacks=[ImbalanceMonitor()])
    with pytest.raises(MMLearnError, match="ImbalanceMonitor: needs an mmlearn DataModule"):
        trainer.fit(model, dm.train_dataloader(), dm.val_dataloader())


SYN = ["--data", "SyntheticMultimodal", "--data.n_train=256", "--data.n_val=64"]


def test_the_cli_adds_the_monitor_with_callbacks_plus(run_cli, capsys, tmp_path: Path) -> None:
    add = [
        "--trainer.callbacks+=mmlearn.callbacks.ImbalanceMonitor",
        "--trainer.callbacks.train_samples=128",
        "--trainer.callbacks.val_samples=48",
    ]
    cli = run_cli("fit", "--model", "LateFusionHeads", *SYN, "--trainer.max_epochs=2", *add)
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, ImbalanceMonitor)]
    assert len(monitors) == 1 and monitors[0].train_samples == 128
    assert len(monitors[0].indices["val"]) == 48
    run = Path(cli.trainer.log_dir)
    cols = _columns(run / "metrics.csv")
    for key in ("probe/joint.m0", "probe/joint.m1", "grad_norm/joint.m0", "cos/m1"):
        assert len(cols[f"monitor/{key}"]) == 2, key
    assert "mmlearn.callbacks.ImbalanceMonitor" in (run / "config.yaml").read_text()
    # a bad option is a one-line error naming it, before anything trains
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    bad = [*add[:1], "--trainer.callbacks.val_samples=0", *save]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model", "InterOnly", *SYN, *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "ImbalanceMonitor: val_samples=0" in err and "Traceback" not in err


class SaveAt(pl.Callback):
    """Save a checkpoint after training batch ``step`` (a preemption inside the epoch)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("name", ["LateFusionHeads", "MultiObjective"])
def test_a_fit_resumed_inside_an_epoch_logs_the_whole_epochs_mean(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / "mid.ckpt"
    logged = []
    for resume in (False, True):
        pl.seed_everything(2)
        dm = _data(n_train=320, batch_size=64)  # 5 steps; saved after the 3rd
        model = _model(name, dm)
        monitor = ImbalanceMonitor(train_samples=64, val_samples=64)
        extra = [] if resume else [SaveAt(3, path)]
        trainer = quiet_trainer(callbacks=[monitor, *extra])
        trainer.fit(model, datamodule=dm, ckpt_path=path if resume else None)
        assert trainer.global_step == 5
        logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if "grad" in k})
    assert logged[0] and logged[0].keys() == logged[1].keys()
    for key, value in logged[0].items():
        assert logged[1][key] == pytest.approx(value, rel=1e-5), key
