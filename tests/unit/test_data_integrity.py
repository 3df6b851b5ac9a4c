"""Data integrity: every DataModule serves exactly its source samples, each in one split.

A leak between splits or a view cut from the wrong pixels leaves training running and every
number plausible. These tests identify each served sample by its SOURCE content (the raw files
read here with numpy, gzip, csv, json, pickle, wave and PIL), never by the module's own index
arithmetic, and recompute independently what every modality must hold: the raw columns or pixel
blocks, standardised with statistics of the training rows only.

Standardisation hides the raw values, so samples are identified on a module built with
``standardize`` replaced by the identity (same seed, same arguments); the real module must then
serve, in the same order, the raw rows standardised with the mean and (unbiased) std of the rows
identified as training.
"""

from __future__ import annotations

import csv
import gzip
import json
import pickle
import shutil
import wave
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import mmlearn.data.fashion as fashion_module
import mmlearn.data.mfeat as mfeat_module
import mmlearn.data.mimic as mimic_module
from mmlearn.data import (
    AVMNIST,
    MIMIC,
    AudioVisualClips,
    FashionMNISTViews,
    ImageText,
    MultipleFeatures,
    SyntheticMultimodal,
    TableDataModule,
)
from mmlearn.data.base import MultimodalDataModule, Split
from mmlearn.data.fixtures import (
    write_av_clips,
    write_avmnist,
    write_fashion_mnist,
    write_image_text,
    write_mimic,
    write_table,
)

SPLITS = ("train", "val", "test")
Rows = dict[str, list[Any]]  # split -> the source sample of each served sample, in order


# ---- shared helpers --------------------------------------------------------------------------
def lookup_of(keys: Sequence[bytes], ids: Sequence[Hashable] | None = None) -> dict[bytes, list]:
    """Content -> the source samples holding it (several where the source has duplicates)."""
    out: dict[bytes, list] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i if ids is None else ids[i])
    return out


def assign(served: dict[str, Sequence[bytes]], lookup: dict[bytes, list], by: str) -> Rows:
    """The source sample of every served sample, matched by content; each source sample once.

    Fails when a served sample matches no source sample, or when a content is served more often
    than the source holds it (a source sample in two splits, or twice in one).
    """
    left = {k: list(v) for k, v in lookup.items()}
    where: dict[bytes, list[str]] = {}
    rows: Rows = {}
    for split, keys in served.items():
        rows[split] = []
        for i, key in enumerate(keys):
            assert key in lookup, f"{split} sample {i} matches no source sample by {by}"
            assert left[key], (
                f"{split} sample {i} repeats source sample(s) {lookup[key]}, already served in "
                f"{where[key]}: a sample served twice"
            )
            rows[split].append(left[key].pop(0))
            where.setdefault(key, []).append(split)
    return rows


def assert_partition(rows: Rows, universe: Sequence[Hashable]) -> None:
    """The splits are disjoint and together hold every source sample exactly once."""
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = set(rows[a]) & set(rows[b])
        assert not shared, f"{a} and {b} share source samples {sorted(shared)[:5]}"
    served = Counter(r for split in SPLITS for r in rows[split])
    assert served == Counter(universe), "the splits do not hold every source sample once"


def float_keys(x: np.ndarray | torch.Tensor) -> list[bytes]:
    """One key per sample: the float32 bytes of its values."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    arr = np.ascontiguousarray(arr.reshape(len(arr), -1), dtype=np.float32)
    return [r.tobytes() for r in arr]


def concat(split: Split, modalities: Sequence[str]) -> torch.Tensor:
    n = len(split.target)
    return torch.cat([split.inputs[m].reshape(n, -1).float() for m in modalities], 1)


def standardised(values: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``values`` standardised per feature with the mean and unbiased std of ``train``."""
    ref = train.astype(np.float64)
    mean, std = ref.mean(0), ref.std(0, ddof=1)
    std = np.where(std > 1e-8, std, 1.0)  # a constant feature is only centred
    return (values.astype(np.float64) - mean) / std


def unstandardised(
    module: ModuleType, make: Callable[[], MultimodalDataModule]
) -> dict[str, Split]:
    """``make().splits`` with ``module.standardize`` replaced by the identity."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "standardize", lambda splits: splits)
        return make().splits


def close(got: torch.Tensor, expected: np.ndarray, what: str, atol: float = 1e-4) -> None:
    """``got`` equals ``expected`` in shape and, value by value, within ``atol`` + 1e-4 relative."""
    values = got.double().numpy()
    assert values.shape == expected.shape, (
        f"{what}: shape {values.shape}, expected {expected.shape}"
    )
    err = np.abs(values - expected) - 1e-4 * np.abs(expected)
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape))
    assert err[worst] <= atol, (
        f"{what}: at {worst} served {values[worst]:.6g}, expected {expected[worst]:.6g}"
    )


# ---- SyntheticMultimodal ---------------------------------------------------------------------
SYN = {"num_classes": 3, "n_train": 400, "n_val": 50, "n_test": 400}


def test_synthetic_splits_share_no_sample_and_follow_the_seed_alone() -> None:
    dm = SyntheticMultimodal(**SYN, seed=5)
    keys = {s: float_keys(concat(dm.splits[s], dm.modalities)) for s in SPLITS}
    every = [k for s in SPLITS for k in keys[s]]
    assert len(set(every)) == len(every), "a generated sample appears twice (in or across splits)"
    for m in dm.modalities:  # also no single modality is reused between splits
        seen = [k for s in SPLITS for k in float_keys(dm.splits[s].inputs[m])]
        assert len(set(seen)) == len(seen), m
    same = SyntheticMultimodal(**SYN, seed=5, batch_size=3, num_workers=1)
    other = SyntheticMultimodal(**SYN, seed=6)
    for s in SPLITS:
        assert float_keys(concat(same.splits[s], dm.modalities)) == keys[s], s
        assert torch.equal(same.splits[s].target, dm.splits[s].target), s
        assert not set(float_keys(concat(other.splits[s], dm.modalities))) & set(keys[s]), s


def test_synthetic_test_split_is_drawn_like_train() -> None:
    """Class centroids fitted on train classify test as well as train (same maps, embeddings)."""
    dm = SyntheticMultimodal(**SYN, seed=0)
    train = dm.splits["train"]
    for m in dm.modalities:
        centroids = torch.stack([train.inputs[m][train.target == k].mean(0) for k in range(3)])

        def acc(split: Split, m: str = m, c: torch.Tensor = centroids) -> float:
            return float((torch.cdist(split.inputs[m], c).argmin(1) == split.target).float().mean())

        acc_train, acc_test = acc(train), acc(dm.splits["test"])
        assert acc_test > 0.7 and acc_test > acc_train - 0.1, (m, acc_train, acc_test)


# ---- MultipleFeatures (the real UCI files) ---------------------------------------------------
MFEAT = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}  # UCI's description


@pytest.fixture(scope="module")
def mfeat_raw(mfeat_root: Path) -> dict[str, np.ndarray]:
    raw = {v: np.loadtxt(mfeat_root / "mfeat" / f"mfeat-{v}") for v in MFEAT}
    assert {v: a.shape for v, a in raw.items()} == {v: (2000, d) for v, d in MFEAT.items()}
    return raw


def mfeat_rows(root: Path, raw: dict[str, np.ndarray], by: Sequence[str], **kw: Any) -> Rows:
    """Source rows of every split, found by the raw values of the views ``by``."""
    splits = unstandardised(mfeat_module, lambda: MultipleFeatures(root=str(root), **kw))
    lookup = lookup_of(float_keys(np.hstack([raw[v] for v in by])))
    served = {s: float_keys(concat(splits[s], by)) for s in SPLITS}
    return assign(served, lookup, f"the raw values of {'+'.join(by)}")


def test_mfeat_splits_partition_the_2000_source_rows(
    mfeat_root: Path, mfeat_raw: dict[str, np.ndarray]
) -> None:
    splits = unstandardised(mfeat_module, lambda: MultipleFeatures(root=str(mfeat_root), seed=0))
    lookup = lookup_of(float_keys(np.hstack([mfeat_raw[v] for v in MFEAT])))
    served = {s: float_keys(concat(splits[s], list(MFEAT))) for s in SPLITS}
    rows = assign(served, lookup, "the raw values of all six views")
    assert_partition(rows, range(2000))
    for s in SPLITS:  # UCI: 200 digits per class, stored in class order
        assert splits[s].target.tolist() == [r // 200 for r in rows[s]], s
    # stratified: 25% / 15% of each class
    assert Counter(r // 200 for r in rows["test"]) == dict.fromkeys(range(10), 50)
    assert Counter(r // 200 for r in rows["val"]) == dict.fromkeys(range(10), 30)


def test_mfeat_split_is_a_function_of_the_seed_alone(
    mfeat_root: Path, mfeat_raw: dict[str, np.ndarray]
) -> None:
    by = ["fou", "mor"]  # together unique per row, like all six views
    ref = mfeat_rows(mfeat_root, mfeat_raw, by, seed=0, views=by)
    same = mfeat_rows(
        mfeat_root,
        mfeat_raw,
        by,
        seed=0,
        views=["mor", "pix", "fou"],
        pix_as_image=True,
        batch_size=7,
        num_workers=1,
    )
    other = mfeat_rows(mfeat_root, mfeat_raw, by, seed=1, views=by)
    for s in SPLITS:
        assert sorted(same[s]) == sorted(ref[s]), f"{s}: other views/batch size moved samples"
    assert set(other["test"]) != set(ref["test"]), "seed 1 gives seed 0's test split"
    assert len(set(other["test"]) & set(ref["test"])) < 250  # ~25% overlap expected by chance


def test_mfeat_views_are_raw_columns_standardised_with_train_statistics(
    mfeat_root: Path, mfeat_raw: dict[str, np.ndarray]
) -> None:
    rows = mfeat_rows(mfeat_root, mfeat_raw, ["fou", "mor"], seed=3, pix_as_image=True)
    dm = MultipleFeatures(root=str(mfeat_root), seed=3, pix_as_image=True)
    assert dm.input_shapes == {v: [d] for v, d in MFEAT.items()} | {"pix": [1, 16, 15]}
    for s in SPLITS:
        for v in MFEAT:
            expected = standardised(mfeat_raw[v][rows[s]], mfeat_raw[v][rows["train"]])
            served = dm.splits[s].inputs[v].reshape(len(rows[s]), -1)
            close(served, expected, f"{s}/{v}")
    # the comparison tells the statistics apart: the test split's own would not match
    test = mfeat_raw["fou"][rows["test"]]
    own = standardised(test, test)
    gap = (dm.splits["test"].inputs["fou"].double() - torch.from_numpy(own)).abs().max()
    assert gap > 0.05


def test_mfeat_pix_image_is_16_high_by_15_wide(
    mfeat_root: Path, mfeat_raw: dict[str, np.ndarray]
) -> None:
    pix = mfeat_raw["pix"]

    def vertical_correlation(width: int) -> float:
        img = pix.reshape(len(pix), -1, width)
        return float(np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1])

    # the data agrees with UCI's 15 x 16 grid: rows of 15 line up pixel over pixel
    assert vertical_correlation(15) > vertical_correlation(16) + 0.1
    rows = mfeat_rows(mfeat_root, mfeat_raw, ["fou", "mor"], seed=0, pix_as_image=True)
    splits = unstandardised(
        mfeat_module, lambda: MultipleFeatures(root=str(mfeat_root), seed=0, pix_as_image=True)
    )
    for s in SPLITS:  # rows found by two other views; pixel (r, c) is raw column 15 r + c
        image = splits[s].inputs["pix"]
        assert image.shape[1:] == (1, 16, 15)
        expected = np.stack([pix[r].reshape(16, 15) for r in rows[s]])[:, None]
        assert np.array_equal(image.numpy(), expected.astype(np.float32)), s


# ---- TableDataModule -------------------------------------------------------------------------
CLIN, GENE = [f"clin_{j}" for j in range(4)], [f"gene_{j}" for j in range(3)]
PREFIXES = {"clinical": "clin_", "genes": "gene_"}


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The miniature table written as CSV, and its cells read back with the csv module."""
    path = write_table(tmp_path_factory.mktemp("table") / "t.csv")
    with open(path, newline="") as f:
        header, *cells = list(csv.reader(f))
    columns = {h: [r[j] for r in cells] for j, h in enumerate(header)}
    return {
        "path": path,
        "columns": columns,
        "features": {c: np.array(columns[c], dtype=np.float64) for c in CLIN + GENE},
    }


def table_rows(
    splits: dict[str, Split], table: dict[str, Any], groups: dict[str, list[str]]
) -> Rows:
    """Source rows of every split, matched on the raw cells of ``groups`` in the given order."""
    raw = np.stack([table["features"][c] for cols in groups.values() for c in cols], 1)
    served = {s: float_keys(concat(splits[s], list(groups))) for s in SPLITS}
    return assign(served, lookup_of(float_keys(raw)), f"the raw cells of {groups}")


def test_table_stratified_split_partitions_rows_by_seed_alone(table: dict[str, Any]) -> None:
    path, columns = str(table["path"]), table["columns"]
    both = {"clinical": CLIN, "genes": GENE}

    def rows(groups: dict[str, list[str]], **kw: Any) -> Rows:
        dm = TableDataModule(path, "species", modalities=groups, standardize=False, **kw)
        found = table_rows(dm.splits, table, groups)
        classes = sorted(set(columns["species"]))
        for s in SPLITS:
            labels = [classes.index(columns["species"][r]) for r in found[s]]
            assert dm.splits[s].target.tolist() == labels, s
        return found

    ref = rows(both, seed=3)
    assert_partition(ref, range(240))
    per_class = Counter(columns["species"])
    for s, fraction in (("val", 0.15), ("test", 0.15)):
        got = Counter(columns["species"][r] for r in ref[s])
        assert got == {c: round(fraction * n) for c, n in per_class.items()}, s
    same = rows({"clinical": CLIN}, seed=3, batch_size=5, num_workers=1)
    assert all(sorted(same[s]) == sorted(ref[s]) for s in SPLITS), "subset/batch moved samples"
    other = rows(both, seed=4)
    assert set(other["test"]) != set(ref["test"])


def test_table_split_column_and_dropped_rows_are_obeyed(
    table: dict[str, Any], tmp_path: Path
) -> None:
    lines = Path(table["path"]).read_text().splitlines()
    cells = lines[1 + 17].split(",")
    cells[3 + 2] = "NA"  # row 17, clin_2 missing
    lines[1 + 17] = ",".join(cells)
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    groups = {"clinical": CLIN, "genes": GENE}
    dm = TableDataModule(
        str(path),
        "species",
        modalities=groups,
        split_column="split",
        missing="drop",
        standardize=False,
    )
    found = table_rows(dm.splits, table, groups)
    split_of = table["columns"]["split"]
    assert_partition(found, [r for r in range(240) if r != 17])
    for s in SPLITS:
        assert {split_of[r] for r in found[s]} == {s}, s


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_table_modalities_hold_their_columns_in_order(
    table: dict[str, Any], tmp_path: Path, suffix: str
) -> None:
    path = str(write_table(tmp_path / f"t{suffix}"))  # the same cells as the CSV read above
    by_list = {"a": ["gene_2", "clin_0", "clin_3"], "b": ["clin_1", "gene_0"]}
    by_prefix = {"clinical": CLIN, "genes": GENE}  # prefix: columns in file order
    choices: list[tuple[dict[str, Any], dict[str, list[str]]]] = [
        ({"modalities": by_list}, by_list),
        ({"modality_prefixes": PREFIXES}, by_prefix),
    ]
    for kw, groups in choices:
        raw = TableDataModule(path, "species", standardize=False, seed=1, **kw)
        assert raw.input_shapes == {m: [len(c)] for m, c in groups.items()}
        rows = table_rows(raw.splits, table, groups)  # fails unless columns are in this order
        dm = TableDataModule(path, "species", seed=1, **kw)
        for s in SPLITS:
            for m, cols in groups.items():
                feats = np.stack([table["features"][c] for c in cols], 1)
                expected = standardised(feats[rows[s]], feats[rows["train"]])
                close(dm.splits[s].inputs[m], expected, f"{suffix} {s}/{m}")


def test_loaders_serve_exactly_their_split(table: dict[str, Any]) -> None:
    dm = TableDataModule(
        str(table["path"]),
        "species",
        modality_prefixes=PREFIXES,
        standardize=False,
        batch_size=7,
        seed=2,
    )

    def served(loader: DataLoader) -> tuple[list[bytes], list[int]]:
        keys: list[bytes] = []
        targets: list[int] = []
        for batch in loader:
            keys += float_keys(torch.cat([batch.inputs[m] for m in dm.modalities], 1))
            targets += batch.target.tolist()
        return keys, targets

    for name, loader in (
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
        ("test", dm.predict_dataloader()),
    ):
        keys, targets = served(loader)
        assert keys == float_keys(concat(dm.splits[name], dm.modalities)), name
        assert targets == dm.splits[name].target.tolist(), name
    keys, targets = served(dm.train_dataloader())
    train = dm.splits["train"]
    pairs = Counter(zip(keys, targets, strict=True))
    expected = zip(float_keys(concat(train, dm.modalities)), train.target.tolist(), strict=True)
    assert pairs == Counter(expected), "an epoch of train is not each train sample once"


# ---- FashionMNISTViews -----------------------------------------------------------------------
# view -> (rows, columns) of the 28 x 28 image, as documented (halves: top/bottom [1, 14, 28])
BLOCKS: dict[str, dict[str, tuple[slice, slice]]] = {
    "halves": {"top": (slice(0, 14), slice(0, 28)), "bottom": (slice(14, 28), slice(0, 28))},
    "left_right": {"left": (slice(0, 28), slice(0, 14)), "right": (slice(0, 28), slice(14, 28))},
    "quadrants": {
        "top_left": (slice(0, 14), slice(0, 14)),
        "top_right": (slice(0, 14), slice(14, 28)),
        "bottom_left": (slice(14, 28), slice(0, 14)),
        "bottom_right": (slice(14, 28), slice(14, 28)),
    },
}


def read_idx_file(path: Path) -> np.ndarray:
    """An IDX file, read here: magic (2 zero bytes, type, rank), big-endian sizes, uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    rank = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(rank)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(shape)


def read_fashion(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        part: (
            read_idx_file(folder / f"{part}-images-idx3-ubyte.gz"),
            read_idx_file(folder / f"{part}-labels-idx1-ubyte.gz"),
        )
        for part in ("train", "t10k")
    }


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fashion")
    return root, read_fashion(write_fashion_mnist(root))


def fashion_rows(root: Path, raw: dict, layout: str, **kw: Any) -> tuple[Rows, dict[str, Split]]:
    """(part, index) of every served image, found by the set of its pixel blocks.

    The set, not which view holds which block: a swap of views still finds the image, and the
    content tests then name the view that holds the wrong block.
    """
    splits = unstandardised(
        fashion_module, lambda: FashionMNISTViews(root=str(root), layout=layout, **kw)
    )
    ids = [(p, i) for p in ("train", "t10k") for i in range(len(raw[p][0]))]
    blocks = list(BLOCKS[layout].values())
    keys = [b"".join(sorted(raw[p][0][i][r, c].tobytes() for r, c in blocks)) for p, i in ids]
    served = {}
    for s in SPLITS:
        views = []
        for view in BLOCKS[layout]:
            pixels = splits[s].inputs[view][:, 0].numpy() * 255
            assert np.abs(pixels - np.rint(pixels)).max() < 1e-3, f"{s}/{view}: not bytes / 255"
            views.append(np.rint(pixels).astype(np.uint8))
        served[s] = [b"".join(sorted(v[k].tobytes() for v in views)) for k in range(len(views[0]))]
    return assign(served, lookup_of(keys, ids), f"the pixel blocks of {layout}"), splits


@pytest.mark.parametrize("layout", list(BLOCKS))
def test_fashion_test_is_t10k_and_val_is_carved_from_train(
    fashion: tuple[Path, dict], layout: str
) -> None:
    root, raw = fashion
    rows, splits = fashion_rows(root, raw, layout, seed=0)
    assert rows["test"] == [("t10k", i) for i in range(100)], "test is not t10k in file order"
    assert_partition(rows, [("train", i) for i in range(300)] + rows["test"])
    for s in SPLITS:
        assert splits[s].target.tolist() == [int(raw[p][1][i]) for p, i in rows[s]], s
    assert Counter(int(raw["train"][1][i]) for _, i in rows["val"]) == dict.fromkeys(range(10), 3)
    # quick runs: a train subset, a val subset and the first test images, still disjoint
    small, _ = fashion_rows(root, raw, layout, seed=0, limit_train=100, limit_test=40)
    assert small["test"] == [("t10k", i) for i in range(40)]
    assert (len(small["train"]), len(small["val"])) == (100, 20)
    assert all(p == "train" for s in ("train", "val") for p, _ in small[s])
    assert not set(small["train"]) & set(small["val"]), "limit_train put a val image in train"


def test_fashion_split_is_a_function_of_the_seed_alone(fashion: tuple[Path, dict]) -> None:
    root, raw = fashion
    ref, _ = fashion_rows(root, raw, "halves", seed=0)
    same, _ = fashion_rows(root, raw, "quadrants", seed=0, batch_size=3, num_workers=1)
    other, _ = fashion_rows(root, raw, "halves", seed=1)
    assert all(same[s] == ref[s] for s in SPLITS), "the layout or batch size moved samples"
    assert set(other["val"]) != set(ref["val"]) and other["test"] == ref["test"]


@pytest.mark.parametrize("layout", list(BLOCKS))
def test_fashion_views_are_pixel_blocks_standardised_with_train_statistics(
    fashion: tuple[Path, dict], layout: str
) -> None:
    root, raw = fashion
    rows, _ = fashion_rows(root, raw, layout, seed=2)
    dm = FashionMNISTViews(root=str(root), layout=layout, seed=2)
    pixels = {p: raw[p][0].reshape(-1, 784) / 255.0 for p in raw}
    train = np.stack([pixels[p][i] for p, i in rows["train"]])
    for s in SPLITS:
        served = np.stack([pixels[p][i] for p, i in rows[s]])
        expected = standardised(served, train).reshape(-1, 28, 28)
        for view, (r, c) in BLOCKS[layout].items():
            close(dm.splits[s].inputs[view][:, 0], expected[:, r, c], f"{s}/{view}")


def test_real_fashion_mnist_split_and_views(fashion_dir: Path) -> None:
    raw = read_fashion(fashion_dir)
    rows, splits = fashion_rows(
        fashion_dir.parent, raw, "left_right", seed=0, limit_test=300, limit_train=1000
    )
    # content can repeat in the real files: the test image i only has to look like t10k[i]
    t10k = raw["t10k"][0]
    assert all(np.array_equal(raw[p][0][i], t10k[k]) for k, (p, i) in enumerate(rows["test"]))
    assert all(p == "train" for s in ("train", "val") for p, _ in rows[s])
    assert not set(rows["train"]) & set(rows["val"])
    dm = FashionMNISTViews(
        root=str(fashion_dir.parent), layout="left_right", seed=0, limit_test=300, limit_train=1000
    )
    pixels = {p: raw[p][0].reshape(-1, 784) / 255.0 for p in raw}
    train = np.stack([pixels[p][i] for p, i in rows["train"]])
    for s in SPLITS:
        served = np.stack([pixels[p][i] for p, i in rows[s]])
        expected = standardised(served, train).reshape(-1, 28, 28)
        for view, (r, c) in BLOCKS["left_right"].items():
            close(dm.splits[s].inputs[view][:, 0], expected[:, r, c], f"{s}/{view}")
        assert splits[s].target.tolist() == [int(raw[p][1][i]) for p, i in rows[s]]


# ---- AVMNIST ---------------------------------------------------------------------------------
def test_avmnist_is_multibench_fixed_split_with_raw_values(tmp_path: Path) -> None:
    folder = write_avmnist(tmp_path)
    raw = {
        part: {
            "image": np.load(folder / "image" / f"{part}_data.npy"),
            "audio": np.load(folder / "audio" / f"{part}_data.npy"),
            "label": np.load(folder / f"{part}_labels.npy"),
        }
        for part in ("train", "test")
    }
    ids = [(p, i) for p in ("train", "test") for i in range(len(raw[p]["label"]))]
    lookup = lookup_of([raw[p]["image"][i].tobytes() for p, i in ids], ids)

    def rows(**kw: Any) -> tuple[Rows, dict[str, Split]]:
        splits = AVMNIST(root=str(tmp_path), val_size=30, **kw).splits
        keys = {s: [im.tobytes() for im in splits[s].inputs["image"].numpy()] for s in SPLITS}
        return assign(keys, lookup, "the raw image"), splits

    found, splits = rows()
    # MultiBench: the last 5,000 (here val_size) training pairs are val, the test file is test
    assert found == {
        "train": [("train", i) for i in range(120)],
        "val": [("train", i) for i in range(120, 150)],
        "test": [("test", i) for i in range(50)],
    }
    for s in SPLITS:
        image, audio = splits[s].inputs["image"], splits[s].inputs["audio"]
        assert image.shape[1:] == (1, 28, 28) and audio.shape[1:] == (1, 112, 112)
        for k, (p, i) in enumerate(found[s]):
            assert np.array_equal(image[k, 0].numpy(), raw[p]["image"][i].reshape(28, 28))
            assert int(splits[s].target[k]) == int(raw[p]["label"][i])
        expected = np.stack([raw[p]["audio"][i] for p, i in found[s]])[:, None] / 255.0
        close(audio, expected, f"{s}/audio", atol=1e-3)  # float16 storage
    assert rows(limit_train=50)[0]["train"] == [("train", i) for i in range(50)]
    capped, _ = rows(limit_train=1000)
    assert capped["train"] == found["train"] and capped["val"] == found["val"]


# ---- AudioVisualClips ------------------------------------------------------------------------
CREMA_D = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # OGM-GE's class order
CLIP_ARGS = {
    "image_size": 32,
    "num_frames": 2,
    "sample_rate": 8000,
    "seconds": 0.5,
    "n_fft": 64,
    "hop_length": 32,
    "val_fraction": 0.25,
    "prepare_workers": 0,
    "num_workers": 0,
}


@pytest.fixture(scope="module")
def clips_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 + 6 clips: 3 frames of 32 x 32 (not resized), 0.25 s at 16 kHz (resampled, tiled)."""
    root = tmp_path_factory.mktemp("clips")
    return write_av_clips(
        root, n_train=24, n_test=6, frames=3, frame_size=(32, 32), seconds=0.25, rate=16000
    )


def clips_module(source: Path, tmp_path: Path, **kw: Any) -> AudioVisualClips:
    """A module over a fresh copy of the clips (each cache in its own folder), cache built."""
    shutil.copytree(source, tmp_path / "crema-d")
    dm = AudioVisualClips(root=str(tmp_path), **{**CLIP_ARGS, **kw})
    dm.prepare_data()
    return dm


def decode_frames(folder: Path, clip: str) -> np.ndarray:
    """Frames 0 and 2 of 3 (evenly spaced, first and last) as ``[2, 3, H, W]`` uint8."""
    from PIL import Image

    files = sorted((folder / "visual" / "Image-01-FPS" / clip).glob("*.jpg"))
    assert len(files) == 3
    out = []
    for f in (files[0], files[2]):
        with Image.open(f) as img:
            out.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1))
    return np.stack(out)


def log_spectrogram(path: Path, rate: int, seconds: float, n_fft: int, hop: int) -> np.ndarray:
    """The documented spectrogram, computed with numpy: resample linearly, tile, STFT, log."""
    with wave.open(str(path), "rb") as w:
        src_rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768.0
    n = round(len(x) * rate / src_rate)
    at = np.maximum((np.arange(n) + 0.5) * len(x) / n - 0.5, 0)  # half-pixel linear resampling
    x = np.resize(np.interp(at, np.arange(len(x)), x), round(seconds * rate))  # tile
    padded = np.pad(x, n_fft // 2, mode="reflect")
    starts = range(0, len(padded) - n_fft + 1, hop)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([padded[t : t + n_fft] * window for t in starts])
    return np.log(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-7)[None]


def clip_lists(source: Path) -> dict[str, list[list[str]]]:
    return {
        p: list(csv.reader((source / f"{p}.csv").read_text().splitlines()))
        for p in ("train", "test")
    }


def clip_rows(dm: AudioVisualClips, source: Path) -> Rows:
    """The clip of every served sample, found by its first frame."""
    names = [c for listed in clip_lists(source).values() for c, _ in listed]
    lookup = lookup_of([decode_frames(source, c)[0].tobytes() for c in names], names)
    served = {s: [v[0].tobytes() for v in dm.splits[s].inputs["visual"].numpy()] for s in SPLITS}
    return assign(served, lookup, "the first frame")


def test_av_clips_split_follows_the_csv_lists_and_the_seed(
    clips_source: Path, tmp_path: Path
) -> None:
    lists = clip_lists(clips_source)
    label = {c: CREMA_D.index(y) for listed in lists.values() for c, y in listed}
    dm = clips_module(clips_source, tmp_path / "a", seed=0)
    rows = clip_rows(dm, clips_source)
    assert rows["test"] == [c for c, _ in lists["test"]], "test is not test.csv in order"
    assert_partition(rows, [c for listed in lists.values() for c, _ in listed])
    assert set(rows["val"]) | set(rows["train"]) == {c for c, _ in lists["train"]}
    for s in SPLITS:
        assert dm.splits[s].target.tolist() == [label[c] for c in rows[s]], s
    assert Counter(label[c] for c in rows["val"]) == dict.fromkeys(range(6), 1)  # stratified
    same = clip_rows(clips_module(clips_source, tmp_path / "b", seed=0, batch_size=3), clips_source)
    other = clip_rows(clips_module(clips_source, tmp_path / "c", seed=1), clips_source)
    assert same == rows
    assert set(other["val"]) != set(rows["val"]) and other["test"] == rows["test"]


def test_av_clips_frames_and_spectrograms_match_the_files(
    clips_source: Path, tmp_path: Path
) -> None:
    dm = clips_module(clips_source, tmp_path, seed=0)
    rows = clip_rows(dm, clips_source)
    assert dm.input_shapes == {"visual": [2, 3, 32, 32], "audio": [1, 33, 126]}
    for s in SPLITS:
        visual, audio = dm.splits[s].inputs["visual"], dm.splits[s].inputs["audio"]
        for k, clip in enumerate(rows[s]):
            assert np.array_equal(visual[k].numpy(), decode_frames(clips_source, clip)), clip
            expected = log_spectrogram(clips_source / "audio" / f"{clip}.wav", 8000, 0.5, 64, 32)
            close(audio[k], expected, f"{s}/{clip} audio", atol=2e-2)  # float16 storage


# ---- ImageText -------------------------------------------------------------------------------
TEXT_ARGS = {"image_size": 24, "max_length": 16, "prepare_workers": 0, "num_workers": 0}


def read_records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        p: [json.loads(line) for line in (folder / f"{p}.jsonl").read_text().splitlines() if line]
        for p in ("train", "test")
    }


def image_text_rows(dm: ImageText, folder: Path) -> Rows:
    """``(part, line)`` of every served record, found by its decoded 24 x 24 image (no resize)."""
    from PIL import Image

    records = read_records(folder)
    ids = [(p, i) for p in records for i in range(len(records[p]))]
    keys = []
    for p, i in ids:
        with Image.open(folder / records[p][i]["image"]) as img:
            keys.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1).tobytes())
    served = {s: [im.tobytes() for im in dm.splits[s].inputs["image"].numpy()] for s in SPLITS}
    return assign(served, lookup_of(keys, ids), "the image file")


def image_text_module(folder: Path, tmp_path: Path, **kw: Any) -> ImageText:
    shutil.copytree(folder, tmp_path / "image-text", ignore=shutil.ignore_patterns("cache"))
    dm = ImageText(root=str(tmp_path), **{**TEXT_ARGS, **kw})
    dm.prepare_data()
    return dm


def test_image_text_split_follows_the_jsonl_files_and_the_seed(tmp_path: Path) -> None:
    folder = write_image_text(tmp_path / "source", size=24)
    dm = image_text_module(folder, tmp_path / "a", seed=0)
    rows = image_text_rows(dm, folder)
    assert rows["test"] == [("test", i) for i in range(12)], "test is not test.jsonl in order"
    assert_partition(rows, [("train", i) for i in range(36)] + [("test", i) for i in range(12)])
    assert len(rows["val"]) == 3  # 10% of each class of 12, stratified
    same = image_text_rows(image_text_module(folder, tmp_path / "b", seed=0, batch_size=5), folder)
    other = image_text_rows(image_text_module(folder, tmp_path / "c", seed=1), folder)
    assert same == rows
    assert set(other["val"]) != set(rows["val"]) and other["test"] == rows["test"]


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_image_text_images_tokens_and_labels_match_the_records(
    tmp_path: Path, multilabel: bool
) -> None:
    from transformers import AutoTokenizer

    from mmlearn.encoders.huggingface import minilm_path

    folder = write_image_text(tmp_path / "source", size=24, multilabel=multilabel)
    dm = image_text_module(folder, tmp_path / "a", seed=0)
    rows = image_text_rows(dm, folder)  # images match their record's file, pixel for pixel
    records = read_records(folder)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    labels = [r["label"] if multilabel else [r["label"]] for r in records["train"]]
    classes = sorted({y for ys in labels for y in ys})
    assert dm.classes == classes
    for s in SPLITS:
        recs = [records[p][i] for p, i in rows[s]]
        ids = tok([r["text"] for r in recs], padding="max_length", truncation=True, max_length=16)
        assert dm.splits[s].inputs["text"].tolist() == ids["input_ids"], f"{s}: text misaligned"
        target = dm.splits[s].target
        if multilabel:
            hot = [[float(c in r["label"]) for c in classes] for r in recs]
            assert target.tolist() == hot, s
        else:
            assert target.tolist() == [classes.index(r["label"]) for r in recs], s


# ---- MIMIC -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mimic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = write_mimic(tmp_path_factory.mktemp("mimic"))
    with open(path, "rb") as f:
        data = pickle.load(f)
    clean = {
        k: np.nan_to_num(np.asarray(data[k], np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        for k in ("adm_features_all", "ep_tdata")
    }
    assert not np.isfinite(data["adm_features_all"]).all()  # the miniature has NaN/inf to clean
    return path, {**data, **clean}


def mimic_rows(path: Path, raw: dict[str, np.ndarray], **kw: Any) -> tuple[Rows, dict]:
    splits = unstandardised(mimic_module, lambda: MIMIC(str(path), **kw))
    both = np.hstack([raw["adm_features_all"], raw["ep_tdata"].reshape(len(raw["ep_tdata"]), -1)])
    served = {s: float_keys(concat(splits[s], ["static", "timeseries"])) for s in SPLITS}
    return assign(served, lookup_of(float_keys(both)), "the cleaned raw values"), splits


def test_mimic_split_partitions_admissions_by_seed_alone(
    mimic: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, raw = mimic
    rows, _ = mimic_rows(path, raw, seed=0)
    assert_partition(rows, range(300))
    assert [len(rows[s]) for s in SPLITS] == [240, 30, 30]  # 10% val, 10% test
    same, _ = mimic_rows(path, raw, seed=0, task=0, batch_size=9)
    other, _ = mimic_rows(path, raw, seed=1)
    assert same == rows, "the task or batch size moved admissions between splits"
    assert set(other["test"]) != set(rows["test"])


@pytest.mark.parametrize("task", [-1, 0, 7])
def test_mimic_modalities_and_labels_match_the_pickle(
    mimic: tuple[Path, dict[str, np.ndarray]], task: int
) -> None:
    path, raw = mimic
    rows, _ = mimic_rows(path, raw, seed=4, task=task)
    dm = MIMIC(str(path), seed=4, task=task)
    outcome = raw["adm_labels_all"][:, 1:6] > 0  # mortality: first positive of columns 1..5
    first = [1 + list(o).index(True) if o.any() else 0 for o in outcome]
    labels = first if task < 0 else (raw["y_icd9"][:, task] > 0).astype(int).tolist()
    series = raw["ep_tdata"].reshape(300, -1)
    for s in SPLITS:
        assert dm.splits[s].target.tolist() == [labels[r] for r in rows[s]], s
        static = raw["adm_features_all"]
        static = standardised(static[rows[s]], static[rows["train"]])
        close(dm.splits[s].inputs["static"], static, f"{s}/static")
        expected = standardised(series[rows[s]], series[rows["train"]]).reshape(-1, 24, 12)
        close(dm.splits[s].inputs["timeseries"], expected, f"{s}/timeseries")
