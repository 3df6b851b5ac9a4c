"""The options every DataModule has: modality dropout, train_fraction, the stored input means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from helpers import Given, quiet_trainer  # noqa: I001  (tests/helpers.py)
from mmlearn.batch import MultimodalBatch
from mmlearn.data import AVMNIST, SyntheticMultimodal, TableDataModule
from mmlearn.data.base import MultimodalDataModule, Split, stored_input_means
from mmlearn.data.fixtures import write_avmnist, write_table
from mmlearn.errors import MMLearnError
from mmlearn.strategies import InterOnly

SMALL = {"n_train": 400, "n_val": 50, "n_test": 60, "batch_size": 64}


def syn(**kw: Any) -> SyntheticMultimodal:
    dm = SyntheticMultimodal(**(SMALL | kw))
    dm.setup("fit")
    return dm


def epoch(dm: MultimodalDataModule, e: int = 0, loader: Any = None) -> list[MultimodalBatch]:
    """The training batches of epoch ``e`` as a step sees them (after the device hook)."""
    loader = loader if loader is not None else dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(e)
    return [dm.on_after_batch_transfer(b, 0) for b in loader]


def order(dm: MultimodalDataModule, e: int = 0) -> list[int]:
    """The sample indices of epoch ``e`` in the order the training loader serves them."""
    sampler = dm.train_dataloader().batch_sampler.sampler
    sampler.set_epoch(e)
    return list(sampler)


def masks(dm: MultimodalDataModule, e: int = 0, loader: Any = None) -> torch.Tensor:
    """bool ``[N, M]``: which modalities each training sample (by index) keeps in epoch ``e``."""
    batches = epoch(dm, e, loader)
    served = torch.stack(
        [torch.cat([b.present[m] for b in batches]) for m in dm.modalities], 1
    )  # in serving order
    out = torch.empty_like(served)
    out[torch.tensor(order(dm, e))] = served
    return out


# ---- modality dropout ---------------------------------------------------------------------
def test_dropout_removes_about_p_never_everything_and_fills_the_training_mean() -> None:
    dm = syn(n_train=2000, modality_dropout=0.5, seed=3)
    batches = epoch(dm)
    means = dm.input_means()
    train = dm.splits["train"]
    idx = torch.tensor(order(dm))
    keep = torch.stack([torch.cat([b.present[m] for b in batches]) for m in dm.modalities], 1)
    # each of M=2 modalities dropped with p, conditioned on "not both": P(absent) per entry is
    # (p - p^M) / (1 - p^M) = 1/3 (keeping one at random instead would give 0.375, no rule 0.5)
    p, m = 0.5, 2
    expected = (p - p**m) / (1 - p**m)
    share = 1 - keep.float().mean().item()
    assert abs(share - expected) < 0.02, share
    assert keep.any(1).all()  # no sample loses every modality
    assert (~keep).any(0).all()  # and each modality is dropped somewhere
    for j, name in enumerate(dm.modalities):
        got = torch.cat([b.inputs[name] for b in batches])
        original = train.inputs[name][idx]
        absent = ~keep[:, j]
        assert torch.equal(got[~absent], original[~absent])  # present inputs untouched
        assert torch.equal(got[absent], means[name].expand(int(absent.sum()), -1))  # exactly
        assert not torch.equal(means[name], torch.zeros_like(means[name]))  # mean, not zeros
    for loader, split in ((dm.val_dataloader(), "val"), (dm.test_dataloader(), "test")):
        served = [dm.on_after_batch_transfer(b, 0) for b in loader]
        assert all(b.present is None for b in served)
        for name in dm.modalities:
            got = torch.cat([b.inputs[name] for b in served])
            assert torch.equal(got, dm.splits[split].inputs[name])
    assert all(b.present is None for b in dm.predict_dataloader())


def test_zero_fill_replaces_removed_inputs_by_zeros() -> None:
    dm = syn(modality_dropout=0.4, modality_dropout_fill="zero")
    for b in epoch(dm):
        for name in dm.modalities:
            absent = ~b.present[name]
            assert torch.equal(b.inputs[name][absent], torch.zeros_like(b.inputs[name][absent]))


def test_masks_follow_seed_epoch_and_index_only() -> None:
    first = masks(syn(modality_dropout=0.5, seed=1))
    assert torch.equal(first, masks(syn(modality_dropout=0.5, seed=1)))  # another DataModule
    workers = syn(modality_dropout=0.5, seed=1, num_workers=2)
    loader = workers.train_dataloader()
    assert loader.num_workers == 2
    assert torch.equal(first, masks(workers, loader=loader))  # workers are other processes
    # the batches too: same inputs, same fill, whatever the workers
    one = epoch(syn(modality_dropout=0.5, seed=1))
    two = epoch(workers, loader=loader)
    for a, b in zip(one, two, strict=True):
        assert all(torch.equal(a.inputs[m], b.inputs[m]) for m in a.inputs)
    assert not torch.equal(first, masks(syn(modality_dropout=0.5, seed=1), e=1))  # epoch
    assert not torch.equal(first, masks(syn(modality_dropout=0.5, seed=2)))  # seed
    # not the global RNG
    torch.manual_seed(123)
    again = masks(syn(modality_dropout=0.5, seed=1))
    torch.manual_seed(456)
    assert torch.equal(again, first) and torch.equal(
        masks(syn(modality_dropout=0.5, seed=1)), first
    )


def test_a_per_modality_mapping_drops_only_the_named_modalities() -> None:
    dm = syn(n_train=1000, modality_dropout={"m0": 0.0, "m1": 0.9})
    keep = masks(dm)
    assert keep[:, 0].all()  # m0 never dropped
    assert abs((1 - keep[:, 1].float().mean().item()) - 0.9) < 0.03  # nothing to redraw
    only_m1 = syn(num_modalities=3, modality_dropout={"m1": 0.5})  # unnamed ones keep theirs
    keep3 = masks(only_m1)
    assert keep3[:, 0].all() and keep3[:, 2].all() and not keep3[:, 1].all()
    assert dm.dropout_probabilities() == {"m0": 0.0, "m1": 0.9}


def test_no_dropout_leaves_training_batches_as_they_were() -> None:
    dm = syn()
    batches = epoch(dm)
    assert all(b.present is None for b in batches)
    got = torch.cat([b.inputs["m0"] for b in batches])
    assert torch.equal(got, dm.splits["train"].inputs["m0"][torch.tensor(order_plain(dm))])


def order_plain(dm: MultimodalDataModule) -> list[int]:
    sampler = dm.train_dataloader().batch_sampler.sampler
    sampler.set_epoch(0)
    return list(sampler)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.0, r"data.modality_dropout=1.0; expected a probability in \[0, 1\)"),
        (-0.1, r"data.modality_dropout=-0.1; expected a probability in \[0, 1\)"),
        ("high", r"data.modality_dropout='high'; expected a probability"),
        (True, r"data.modality_dropout=True; expected a probability"),
        ({"m0": 1.5}, r"data.modality_dropout=\{'m0': 1.5\}: 'm0' has 1.5; expected"),
        ({"m0": "x"}, r"data.modality_dropout=\{'m0': 'x'\}: 'm0' has 'x'; expected"),
    ],
)
def test_bad_dropout_values_are_refused_at_init(value: object, message: str) -> None:
    with pytest.raises(MMLearnError, match=message):
        SyntheticMultimodal(**SMALL, modality_dropout=value)  # type: ignore[arg-type]


def test_dropout_options_checked_against_the_data_at_setup() -> None:
    dm = SyntheticMultimodal(**SMALL, modality_dropout={"m0": 0.2, "video": 0.3})
    with pytest.raises(
        MMLearnError,
        match=r"data.modality_dropout=.* names modalities \['video'\] that the data does not "
        r"have; its modalities are \['m0', 'm1'\]",
    ):
        dm.setup("fit")
    with pytest.raises(MMLearnError, match=r"data.modality_dropout_fill='median'; expected one"):
        SyntheticMultimodal(**SMALL, modality_dropout_fill="median")
    single = SyntheticMultimodal(**SMALL, num_modalities=1, modality_dropout=0.3)
    with pytest.raises(MMLearnError, match=r"data.modality_dropout=0.3, but the data has a single"):
        single.setup("fit")
    # token ids have no mean: refused with fill mean, zero token ids with fill zero
    tokens = token_splits()
    with pytest.raises(
        MMLearnError, match=r"removes modality 'ids', whose inputs are torch.int64 .*fill=zero"
    ):
        Given(tokens, modality_dropout=0.5).setup("fit")
    Given(tokens, modality_dropout={"ids": 0.0, "a": 0.5}).setup("fit")  # ids not dropped: fine
    dm2 = Given(tokens, modality_dropout=0.5, modality_dropout_fill="zero", batch_size=8)
    dm2.setup("fit")
    dropped = 0
    for b in epoch(dm2):
        absent = ~b.present["ids"]
        dropped += int(absent.sum())
        assert b.inputs["ids"].dtype == torch.int64 and (b.inputs["ids"][absent] == 0).all()
        assert (b.inputs["ids"][~absent] > 0).all()  # the fixture's ids are >= 1
    assert dropped > 0


def token_splits(n: int = 40) -> dict[str, Split]:
    def one(k: int) -> Split:
        g = torch.Generator().manual_seed(k)
        return Split(
            {"a": torch.randn(k, 3, generator=g), "ids": torch.randint(1, 50, (k, 5), generator=g)},
            torch.arange(k) % 3,
        )

    return {"train": one(n), "val": one(9), "test": one(7)}


def test_a_resumed_epoch_sees_the_masks_of_the_uninterrupted_one() -> None:
    dm = syn(modality_dropout=0.5, seed=4)
    whole = epoch(dm, 1)
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(1)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    again = syn(modality_dropout=0.5, seed=4)  # a new process after a requeue
    resumed = again.train_dataloader()
    resumed.load_state_dict(state)
    rest = epoch(again, 1, resumed)
    assert len(rest) == len(whole) - 2
    for a, b in zip(whole[2:], rest, strict=True):
        assert all(torch.equal(a.present[m], b.present[m]) for m in a.inputs)
        assert all(torch.equal(a.inputs[m], b.inputs[m]) for m in a.inputs)
        assert torch.equal(a.target, b.target)


def test_mmlearn_fit_with_modality_dropout(run_cli) -> None:
    cli = run_cli(
        "fit",
        "--model",
        "I2M2",
        "--data",
        "SyntheticMultimodal",
        "--data.n_train=128",
        "--data.n_val=32",
        "--data.n_test=32",
        "--data.batch_size=32",
        "--data.init_args.modality_dropout=0.3",
        "--trainer.max_epochs=1",
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 4
    assert cli.datamodule.modality_dropout == 0.3 and set(cli.datamodule._fills) == {"m0", "m1"}
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    means = stored_input_means(torch.load(last, weights_only=False))
    assert means is not None and set(means) == {"m0", "m1"}
    torch.testing.assert_close(means["m0"], cli.datamodule.splits["train"].inputs["m0"].mean(0))


class Seen(pl.Callback):
    """Records the training batches a step receives (after the device hook)."""

    def __init__(self) -> None:
        self.batches: list[MultimodalBatch] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, i: int) -> None:
        self.batches.append(batch)


def test_compact_storage_is_filled_on_the_device_in_a_real_fit(tmp_path: Path) -> None:
    write_avmnist(tmp_path)
    dm = AVMNIST(root=str(tmp_path), val_size=30, batch_size=40, modality_dropout=0.5)
    model = InterOnly(input_shapes=dm.input_shapes, num_classes=10)
    seen = Seen()
    quiet_trainer(callbacks=[seen], limit_val_batches=1).fit(model, datamodule=dm)
    means = dm.input_means()
    assert len(seen.batches) == 3
    dropped = 0
    for b in seen.batches:
        assert b.present is not None
        for m, x in b.inputs.items():
            assert x.dtype == torch.float32
            absent = ~b.present[m]
            dropped += int(absent.sum())
            assert torch.equal(x[absent], means[m].expand(int(absent.sum()), *means[m].shape))
    assert dropped > 0


# ---- train_fraction -----------------------------------------------------------------------
def test_train_fraction_keeps_a_stratified_seeded_fraction() -> None:
    full = syn(n_train=1000, num_classes=4, seed=5)
    part = syn(n_train=1000, num_classes=4, seed=5, train_fraction=0.3)
    y_full, y_part = full.splits["train"].target, part.splits["train"].target
    assert abs(len(y_part) - 300) <= 2  # one rounding per class
    counts_full, counts_part = y_full.bincount(minlength=4), y_part.bincount(minlength=4)
    assert (counts_part > 0).all()
    assert ((counts_part.float() - 0.3 * counts_full.float()).abs() <= 0.5).all()  # per class
    # the kept samples are samples of the full split, in their order
    assert part.train_indices is not None
    assert torch.equal(part.train_indices, part.train_indices.sort().values)
    for m in full.modalities:
        kept = full.splits["train"].inputs[m][part.train_indices]
        assert torch.equal(part.splits["train"].inputs[m], kept)
    for s in ("val", "test"):
        assert torch.equal(part.splits[s].target, full.splits[s].target)
        assert torch.equal(part.splits[s].inputs["m0"], full.splits[s].inputs["m0"])
    again = syn(n_train=1000, num_classes=4, seed=5, train_fraction=0.3)
    other = syn(n_train=1000, num_classes=4, seed=6, train_fraction=0.3)
    assert torch.equal(again.train_indices, part.train_indices)
    assert not torch.equal(other.train_indices[:50], part.train_indices[:50])
    # what is computed from the training split uses the reduced one; so does the loader
    torch.testing.assert_close(part.class_frequencies(), counts_part.float() / len(y_part))
    served = sum(b.size for b in part.train_dataloader())
    assert served == len(y_part)
    assert full.train_indices is None


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.2, "half", None])
def test_bad_train_fractions_are_refused(value: object) -> None:
    with pytest.raises(
        MMLearnError, match=r"data.train_fraction=.*; expected a fraction in \(0, 1\]"
    ):
        SyntheticMultimodal(**SMALL, train_fraction=value)  # type: ignore[arg-type]


def test_a_train_fraction_that_empties_a_class_is_an_error_naming_it(tmp_path: Path) -> None:
    splits = token_splits(40)
    splits["train"].target[:] = 0
    splits["train"].target[:2] = 2  # class 2 has 2 training samples
    with pytest.raises(
        MMLearnError,
        match=r"data.train_fraction=0.2 keeps no training sample of class 2, which has 2; "
        r"expected a fraction >= 0.25",
    ):
        Given(splits, train_fraction=0.2).setup("fit")
    assert len(Given(splits, train_fraction=0.25).splits["train"].target) == 1 + 10  # 0.5 up
    # a family with class names names the class
    table = write_table(tmp_path / "t.csv", n=40)
    dm = TableDataModule(
        path=table,
        label_column="species",
        modality_prefixes={"clinical": "clin_", "genes": "gene_"},
        split_column="split",
        train_fraction=0.05,
    )
    with pytest.raises(MMLearnError, match=r"keeps no training sample of class \d \('\w+'\)"):
        dm.setup("fit")


def test_a_table_with_train_fraction_names_the_kept_rows(tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.csv", n=120)
    kw: dict[str, Any] = {
        "path": table,
        "label_column": "species",
        "modality_prefixes": {"clinical": "clin_", "genes": "gene_"},
        "predict_split": "train",
    }
    full, part = TableDataModule(**kw), TableDataModule(**kw, train_fraction=0.5)
    part.setup("predict")
    assert part.train_indices is not None
    ids = full.predict_ids()
    assert part.predict_ids() == [ids[i] for i in part.train_indices.tolist()]
    assert len(part.predict_ids()) == len(part.predict_data().target)


# ---- input means --------------------------------------------------------------------------
def test_input_means_are_the_training_means_of_what_the_model_sees(tmp_path: Path) -> None:
    dm = syn(seed=2)
    means = dm.input_means()
    for m in dm.modalities:
        x = dm.splits["train"].inputs[m]
        torch.testing.assert_close(means[m], x.mean(0))
        assert means[m].dtype == torch.float32 and list(means[m].shape) == dm.input_shapes[m]
    assert dm.state_dict()["input_means_source"] == "training split (400 samples)"
    part = syn(seed=2, train_fraction=0.3)
    x = part.splits["train"].inputs["m0"]
    torch.testing.assert_close(part.input_means()["m0"], x.mean(0))
    assert not torch.allclose(part.input_means()["m0"], means["m0"])
    assert "train_fraction=0.3" in part.state_dict()["input_means_source"]
    # uint8 images / 255, float16 spectrograms as float32
    write_avmnist(tmp_path)
    av = AVMNIST(root=str(tmp_path), val_size=30)
    av_means = av.input_means()
    image, audio = av.splits["train"].inputs["image"], av.splits["train"].inputs["audio"]
    assert image.dtype == torch.uint8 and audio.dtype == torch.float16
    torch.testing.assert_close(av_means["image"], image.double().div(255).mean(0).float())
    torch.testing.assert_close(av_means["audio"], audio.double().mean(0).float())
    assert float(av_means["image"].max()) <= 1.0 < float(image.float().mean(0).max())
    # token ids: no mean
    tokens = Given(token_splits())
    assert tokens.input_means()["ids"] is None
    torch.testing.assert_close(
        tokens.input_means()["a"], token_splits()["train"].inputs["a"].mean(0)
    )


def test_state_dict_round_trip_and_old_checkpoints() -> None:
    dm = syn(seed=7)
    state = dm.state_dict()
    assert set(state) == {"input_means", "input_means_source"}
    other = syn(seed=8)
    assert not torch.equal(other.input_means()["m0"], dm.input_means()["m0"])
    other.load_state_dict(state)
    assert torch.equal(other.input_means()["m0"], dm.input_means()["m0"])  # the checkpoint's
    assert "restored from a checkpoint" in other.state_dict()["input_means_source"]
    # the restored means are what dropout fills in
    other.modality_dropout = 0.5
    b = epoch(other)[0]
    absent = ~b.present["m0"]
    assert torch.equal(b.inputs["m0"][absent], dm.input_means()["m0"].expand(int(absent.sum()), -1))
    fresh = syn(seed=8)
    before = fresh.input_means()["m0"].clone()
    fresh.load_state_dict({})  # a checkpoint written before the means were stored
    fresh.load_state_dict({"something": 1})
    assert torch.equal(fresh.input_means()["m0"], before)
    tokens = Given(token_splits())
    copy = Given(token_splits())
    copy.load_state_dict(tokens.state_dict())
    assert copy.input_means()["ids"] is None


def test_stored_input_means_finds_them_in_a_real_checkpoint(tmp_path: Path) -> None:
    dm = SyntheticMultimodal(**SMALL, seed=1)
    model = InterOnly(input_shapes=dm.input_shapes, num_classes=2)
    trainer = quiet_trainer(limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert "input_means" in checkpoint["SyntheticMultimodal"]  # Lightning's key: __qualname__
    means = stored_input_means(checkpoint)
    assert means is not None and set(means) == {"m0", "m1"}
    for m in ("m0", "m1"):
        torch.testing.assert_close(means[m], dm.splits["train"].inputs[m].mean(0))
    del checkpoint["SyntheticMultimodal"]
    assert stored_input_means(checkpoint) is None
    assert stored_input_means({}) is None
    # resuming restores them into the DataModule (and a checkpoint without them still resumes)
    resumed_dm = SyntheticMultimodal(**SMALL, seed=2)
    resumed = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    resumed.fit(InterOnly(input_shapes=dm.input_shapes, num_classes=2), resumed_dm, ckpt_path=path)
    assert torch.equal(resumed_dm.input_means()["m0"], means["m0"])
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)  # the same checkpoint without the DataModule's entry
    plain_dm = SyntheticMultimodal(**SMALL, seed=2)
    again = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    again.fit(InterOnly(input_shapes=dm.input_shapes, num_classes=2), plain_dm, ckpt_path=old)
    assert again.state.finished
    torch.testing.assert_close(
        plain_dm.input_means()["m0"], plain_dm.splits["train"].inputs["m0"].mean(0)
    )


def test_masks_survive_the_distributed_sampler_lightning_puts_in_under_ddp() -> None:
    """Under DDP Lightning replaces the sampler inside the batch sampler by a DistributedSampler
    (re-creating the batch sampler from its saved arguments): each rank's batches must still
    carry every sample's mask of the epoch, the same on every rank (row i of the epoch's table)."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = SyntheticMultimodal(**SMALL, modality_dropout=0.5)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning asks for it: the init arguments saved
    train = dm.splits["train"]
    row_of = {tuple(x.tolist()): i for i, x in enumerate(train.inputs["m1"])}
    table = loader.batch_sampler.masks().clone()  # epoch 0
    seen: list[int] = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(0)
        shard = _update_dataloader(loader, sampler, RunningStage.TRAINING)
        assert shard.batch_sampler.sampler is sampler
        for batch in shard:
            batch = dm.on_after_batch_transfer(batch, 0)
            assert batch.present is not None
            for j in range(batch.size):
                keep_m1 = bool(batch.present["m1"][j])
                if keep_m1:  # find the sample by its m1 features, check its whole mask
                    i = row_of[tuple(batch.inputs["m1"][j].tolist())]
                    assert [bool(batch.present[m][j]) for m in ("m0", "m1")] == table[i].tolist()
                    seen.append(i)
    kept_m1 = set(table[:, 1].nonzero().flatten().tolist())
    assert set(seen) == kept_m1 and len(seen) == len(kept_m1)  # each once, over the two ranks
