"""The DataModule base: split arithmetic, train-only standardisation, batches, validation."""

from __future__ import annotations

import pytest
import torch

from helpers import Given  # noqa: I001  (tests/helpers.py)
from mmlearn.batch import MultimodalBatch
from mmlearn.data.base import (
    EpochSeededSampler,
    Split,
    SplitDataset,
    standardize,
    stratified_split,
)
from mmlearn.errors import MMLearnError


def split(n: int, offset: int = 0) -> Split:
    x = torch.arange(offset, offset + n, dtype=torch.float32)
    return Split(
        {"a": x[:, None].repeat(1, 2), "ids": torch.arange(n)[:, None]}, torch.arange(n) % 3
    )


def three(n: int = 10) -> dict[str, Split]:
    return {"train": split(n), "val": split(4, 100), "test": split(5, 200)}


def test_stratified_split_sizes_per_class_and_partition() -> None:
    target = torch.tensor([0] * 20 + [1] * 10 + [2] * 7)
    idx = stratified_split(target, 0.2, 0.3, seed=5)
    counts = {s: target[i].bincount(minlength=3).tolist() for s, i in idx.items()}
    # per class: test = round(0.3 n), val = round(0.2 n), train = the rest
    assert counts["test"] == [6, 3, 2] and counts["val"] == [4, 2, 1]
    assert counts["train"] == [10, 5, 4]
    everything = torch.cat(list(idx.values()))
    assert sorted(everything.tolist()) == list(range(37))  # a partition: no index twice
    assert all(torch.equal(i, i.sort().values) for i in idx.values())
    again = stratified_split(target, 0.2, 0.3, seed=5)
    other = stratified_split(target, 0.2, 0.3, seed=6)
    assert all(torch.equal(idx[s], again[s]) for s in idx)
    assert not torch.equal(idx["test"], other["test"])
    no_val = stratified_split(target, 0.0, 0.3, seed=5)
    assert len(no_val["val"]) == 0 and torch.equal(no_val["test"], idx["test"])


@pytest.mark.parametrize(
    ("val", "test"), [(-0.1, 0.2), (1.0, 0.2), (0.2, 0.0), (0.2, 1.0), (0.5, 0.5), (0.6, 0.5)]
)
def test_stratified_split_refuses_bad_fractions(val: float, test: float) -> None:
    message = (
        rf"val_fraction={val}, test_fraction={test}: expected fractions in \[0, 1\) with test > 0 "
        r"and val \+ test < 1$"
    )
    with pytest.raises(MMLearnError, match=message):
        stratified_split(torch.zeros(10, dtype=torch.long), val, test, seed=0)


def test_standardize_uses_train_statistics_only() -> None:
    train = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    test = torch.tensor([[3.0, 7.0, 0.0]])
    ids = torch.tensor([[1], [2], [3]])
    splits = {
        # the integer modality first: it is skipped, the float one after it still standardised
        "train": Split({"ids": ids.clone(), "x": train.clone()}, torch.zeros(3, dtype=torch.long)),
        "test": Split(
            {"ids": ids[:1].clone(), "x": test.clone()}, torch.zeros(1, dtype=torch.long)
        ),
    }
    standardize(splits)
    mean, std = train.mean(0), train.std(0)  # sample std (n - 1), as torch computes it
    std[1] = 1.0  # a constant feature is only centred
    torch.testing.assert_close(splits["train"].inputs["x"], (train - mean) / std)
    torch.testing.assert_close(splits["test"].inputs["x"], (test - mean) / std)
    assert splits["test"].inputs["x"][0].tolist() == pytest.approx([0.0, 2.0, -5.0 / 13**0.5])
    assert torch.equal(splits["train"].inputs["ids"], ids)  # integer modalities are left alone


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    s = EpochSeededSampler(50, seed=3)
    assert len(s) == 50 and sorted(s) == list(range(50))
    first = list(s)
    assert first != list(range(50)) and list(s) == first
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(50))
    s.set_epoch(0)
    assert list(s) == first
    assert list(EpochSeededSampler(50, seed=4)) != first
    assert list(EpochSeededSampler(50, seed=3, shuffle=False)) == list(range(50))


def test_loaders_batch_every_split_in_order_except_train() -> None:
    dm = Given(three(10), batch_size=4, seed=1)
    dm.setup("fit")
    assert dm.modalities == ["a", "ids"] and dm.input_shapes == {"a": [2], "ids": [1]}
    for name, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        got = torch.cat([b.inputs["ids"][:, 0] for b in loader])
        assert got.tolist() == list(range(len(dm.splits[name].target)))
    predicted = [b.inputs["a"][:, 0] for b in dm.predict_dataloader()]
    assert torch.cat(predicted).tolist() == [200.0, 201.0, 202.0, 203.0, 204.0]  # the test split
    train = [b.inputs["ids"][:, 0].tolist() for b in dm.train_dataloader()]
    assert [len(b) for b in train] == [4, 4, 2]  # the last partial batch is kept
    assert sorted(sum(train, [])) == list(range(10)) and sum(train, []) != list(range(10))
    assert len(SplitDataset(dm.splits["train"])) == 10
    workers = Given(three(10), batch_size=4, num_workers=2).val_dataloader()
    assert workers.num_workers == 2 and workers.persistent_workers
    assert not dm.val_dataloader().persistent_workers and dm.val_dataloader().num_workers == 0
    assert Given(three(10), num_workers=1).val_dataloader().persistent_workers


def test_seed_follows_seed_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Given(three()).seed == 0 and Given(three()).batch_size == 64  # the documented default
    monkeypatch.setenv("PL_GLOBAL_SEED", "17")
    assert Given(three()).seed == 17 and Given(three(), seed=2).seed == 2
    with pytest.raises(MMLearnError, match=r"data.batch_size=0; expected >= 1"):
        Given(three(), batch_size=0)
    assert Given(three(), batch_size=1).batch_size == 1


def test_compact_storage_is_converted_per_batch() -> None:
    dm = Given(three())
    u8 = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    f16 = torch.tensor([[0.5, -2.25]], dtype=torch.float16)
    f32 = torch.tensor([[1.5]])
    tokens = torch.tensor([[7, 9]])
    batch = MultimodalBatch({"u": u8, "h": f16, "f": f32, "t": tokens}, torch.tensor([0]))
    out = dm.on_after_batch_transfer(batch, 0)
    assert out.inputs["u"].dtype == torch.float32
    assert out.inputs["u"][0].tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert out.inputs["h"].dtype == torch.float32 and out.inputs["h"].tolist() == [[0.5, -2.25]]
    assert out.inputs["f"] is f32 and out.inputs["t"] is tokens
    assert dm.on_after_batch_transfer("other", 0) == "other"


def labels(t: list[int]) -> torch.Tensor:
    return torch.tensor(t)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("test"), r"given.npz: splits \['test'\] were not produced"),
        (
            lambda s: [v.inputs.clear() for v in s.values()],
            r"given.npz: the data has no modalities",
        ),
        (
            lambda s: [v.inputs.__setitem__("2x", v.inputs.pop("a")) for v in s.values()],
            r"modality name '2x' must match",
        ),
        (
            lambda s: s["val"].__setattr__("target", s["val"].target.int()),
            r"given.npz: val labels have dtype torch.int32; need int64",
        ),
        (
            lambda s: s["test"].target.__setitem__(2, -1),
            r"given.npz: test sample 2 has label -1, outside \[0, 3\)",
        ),
        (
            lambda s: s["train"].target.__setitem__(7, 3),
            r"given.npz: train sample 7 has label 3, outside \[0, 3\)",
        ),
    ],
)
def test_validation_names_split_sample_and_source(mutate, message: str) -> None:
    splits = three()
    mutate(splits)
    dm = Given(splits)
    dm.source = "given.npz"
    with pytest.raises(MMLearnError, match=message):
        dm.setup("fit")


def test_validation_without_a_source_names_the_class() -> None:
    splits = three()
    splits["val"].target[0] = 5
    with pytest.raises(MMLearnError, match=r"^Given: val sample 0 has label 5"):
        Given(splits).setup("fit")


def multihot(n: int, k: int = 3) -> torch.Tensor:
    return (torch.arange(n * k).view(n, k) % 2).long()


def test_multilabel_targets_are_checked() -> None:
    def data(val_target: torch.Tensor) -> Given:
        splits = three()
        for s in splits.values():
            s.target = multihot(len(s.target))
        splits["val"].target = val_target
        dm = Given(splits, multilabel=True)
        dm.source = "ml.jsonl"
        return dm

    data(multihot(4)).setup("fit")  # valid
    with pytest.raises(MMLearnError, match=r"ml.jsonl: val multi-label targets have shape \[4\]"):
        data(torch.zeros(4, dtype=torch.long)).setup("fit")
    with pytest.raises(MMLearnError, match=r"shape \[4, 2\]; expected \[N, 3\] \(multi-hot\)"):
        data(torch.zeros(4, 2, dtype=torch.long)).setup("fit")
    bad = multihot(4)
    bad[2, 1] = 2
    with pytest.raises(MMLearnError, match=r"ml.jsonl: val sample 2 has target \[0, 2, 0\]"):
        data(bad).setup("fit")


def test_multilabel_errors_without_a_source_name_the_class() -> None:
    splits = three()
    for s in splits.values():
        s.target = multihot(len(s.target))
    splits["test"].target = torch.zeros(5, dtype=torch.long)
    with pytest.raises(MMLearnError, match=r"^Given: test multi-label targets have shape \[5\]"):
        Given(splits, multilabel=True).setup("fit")
