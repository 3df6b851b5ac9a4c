"""Miniature copies of each supported on-disk layout, for tests, examples and benchmarks.

Every writer produces the exact files and formats a real dataset of that family has, with few
samples and a learnable signal (each modality carries part of the label), and returns the path to
pass to the DataModule.
"""

from __future__ import annotations

import csv
import gzip
import json
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TABLE_CLASSES = ("cat", "dog", "eel")


def table_rows(n: int = 240, seed: int = 0) -> tuple[list[str], list[list[object]]]:
    """Header and ``n`` rows: id, split, species (the label), clin_0..3, gene_0..2."""
    rng = np.random.default_rng(seed)
    header = [
        "id",
        "split",
        "species",
        *[f"clin_{j}" for j in range(4)],
        *[f"gene_{j}" for j in range(3)],
    ]
    rows: list[list[object]] = []
    for i in range(n):
        y = int(rng.integers(len(TABLE_CLASSES)))
        clin = rng.normal(size=4) + np.eye(4)[y] * 2.0
        gene = rng.normal(size=3) * 0.5 + np.eye(3)[y] * 1.5
        split = "train" if i % 10 < 7 else ("val" if i % 10 < 8 else "test")
        rows.append([f"s{i}", split, TABLE_CLASSES[y], *clin.round(5), *gene.round(5)])
    return header, rows


def write_table(path: str | Path, n: int = 240, seed: int = 0) -> Path:
    """Write :func:`table_rows` as CSV (``.csv``), Parquet (``.parquet``) or NPZ (``.npz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(n, seed)
    columns = {h: [r[j] for r in rows] for j, h in enumerate(header)}
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)
    elif path.suffix == ".npz":
        arrays = {
            k: np.asarray(v) for k, v in columns.items() if not k.startswith(("clin", "gene"))
        }
        arrays["clin"] = np.asarray([r[3:7] for r in rows], dtype=np.float64)  # 2-D: clin_0..3
        arrays["gene"] = np.asarray([r[7:10] for r in rows], dtype=np.float64)
        np.savez(str(path), **arrays)  # type: ignore[arg-type]
    else:
        raise ValueError(f"{path}: choose .csv, .parquet or .npz")
    return path


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = (0x0800 + array.ndim).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(magic + dims + array.astype(np.uint8).tobytes())


def write_fashion_mnist(
    root: str | Path, n_train: int = 300, n_test: int = 100, seed: int = 0
) -> Path:
    """``root/fashion-mnist/`` with the four gzip'd IDX files of Fashion-MNIST, in miniature.

    Class ``y`` lights a bar in row band ``y`` of the top half and column band ``y`` of the bottom
    half (plus noise), so each half alone tells the class apart.
    """
    out = Path(root) / "fashion-mnist"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for part, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(y):
            x[i, c : c + 3, :] += 150  # rows c..c+2 (top half)
            x[i, 14:, 2 * c : 2 * c + 3] += 150  # columns in the bottom half
        _write_idx(out / f"{part}-images-idx3-ubyte.gz", np.clip(x, 0, 255))
        _write_idx(out / f"{part}-labels-idx1-ubyte.gz", y)
    return out


def write_avmnist(root: str | Path, n_train: int = 150, n_test: int = 50, seed: int = 0) -> Path:
    """``root/avmnist/`` in MultiBench's layout, in miniature.

    Images are uint8 ``[N, 784]`` with a bright row band per class; spectrograms are float64
    ``[N, 112, 112]`` in [0, 255] with a bright frequency band per class (MultiBench's arrays
    come in both kinds of dtype; the reader takes either).
    """
    out = Path(root) / "avmnist"
    for sub in ("image", "audio"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for part, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        img = rng.integers(0, 50, size=(n, 28, 28))
        spec = rng.uniform(0, 60, size=(n, 112, 112))
        for i, c in enumerate(y):
            img[i, 2 * c + 3 : 2 * c + 6, :] += 180
            spec[i, 10 * c + 5 : 10 * c + 12, :] += 150
        np.save(out / "image" / f"{part}_data.npy", img.reshape(n, 784).astype(np.uint8))
        np.save(out / "audio" / f"{part}_data.npy", spec)
        np.save(out / f"{part}_labels.npy", y.astype(np.int64))
    return out


def write_av_clips(
    root: str | Path,
    name: str = "crema-d",
    n_train: int = 36,
    n_test: int = 12,
    frames: int = 3,
    frame_size: tuple[int, int] = (64, 48),
    seconds: float = 1.0,
    rate: int = 16000,
    classes: Sequence[str] = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG"),
    seed: int = 0,
) -> Path:
    """``root/name/`` in the OGM-GE layout: ``{train,test}.csv``, JPEG frames, 16-bit WAVs.

    Class ``c`` tints the frames with its own colour and sounds a tone of ``220 * (c + 1)`` Hz.
    With ``frame_size=(480, 360)``, ``seconds=2.5`` and 3 frames the clips have CREMA-D's sizes.
    """
    from PIL import Image

    out = Path(root) / name
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            c = i % len(classes)
            clip = f"{split}_{i:04d}_{classes[c]}"
            rows.append([clip, classes[c]])
            folder = out / "visual" / "Image-01-FPS" / clip
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(c * 40) % 256, (255 - c * 40) % 256, (c * 90) % 256])
            for k in range(frames):
                noise = rng.integers(0, 60, size=(frame_size[1], frame_size[0], 3))
                pixels = np.clip(noise + colour * 0.7, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"frame_{k:05d}.jpg", quality=90)
            wav = np.sin(2 * np.pi * 220 * (c + 1) * t) * 0.5 + rng.normal(0, 0.05, t.size)
            (out / "audio").mkdir(parents=True, exist_ok=True)
            with wave.open(str(out / "audio" / f"{clip}.wav"), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes((np.clip(wav, -1, 1) * 32767).astype(np.int16).tobytes())
        with open(out / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return out


def write_mimic(root: str | Path, n: int = 300, seed: int = 0) -> Path:
    """``root/mimic/im.pk`` with MultiBench's keys and shapes, in miniature.

    Mortality class ``c`` (0..5) shifts static feature ``c % 5`` and time-series channel ``c``;
    ICD-9 group 0 follows ``c > 2``. A few NaN/inf values appear, as in the real pickle.
    """
    import pickle

    rng = np.random.default_rng(seed)
    c = np.arange(n) % 6
    rng.shuffle(c)
    static = rng.normal(size=(n, 5))
    series = rng.normal(size=(n, 24, 12))
    static[np.arange(n), c % 5] += 2.5
    series[np.arange(n), :, c] += 1.5
    static[0, 1], series[1, 3, 2] = np.nan, np.inf
    labels = np.zeros((n, 6))
    labels[c > 0, c[c > 0]] = 1
    icd9 = rng.integers(0, 2, size=(n, 20)).astype(np.float64)
    icd9[:, 0] = c > 2
    data = {
        "adm_features_all": static,
        "ep_tdata": series,
        "adm_labels_all": labels,
        "y_icd9": icd9,
    }
    out = Path(root) / "mimic"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "im.pk", "wb") as f:
        pickle.dump(data, f)
    return out / "im.pk"


IMAGE_TEXT_CLASSES = ("pizza", "ramen", "salad")


def write_image_text(
    root: str | Path,
    name: str = "image-text",
    n_train: int = 36,
    n_test: int = 12,
    size: int = 40,
    seed: int = 0,
    multilabel: bool = False,
) -> Path:
    """``root/name/`` with ``{train,test}.jsonl`` and JPEGs: a UPMC-Food-101-style miniature.

    Class ``c`` tints its image with its own colour and its caption names the dish. With
    ``multilabel`` (MM-IMDb style) every other record also has the next dish, named in its caption
    only, and ``label`` is a list.
    """
    from PIL import Image

    out = Path(root) / name
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["tasty", "fresh", "homemade", "spicy", "warm"]
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            c = i % len(IMAGE_TEXT_CLASSES)
            dish = IMAGE_TEXT_CLASSES[c]
            colour = np.array([[200, 60, 40], [230, 200, 90], [60, 180, 70]][c])
            pixels = np.clip(rng.integers(0, 70, size=(size, size, 3)) + colour * 0.7, 0, 255)
            rel = f"images/{split}_{i:04d}.jpg"
            Image.fromarray(pixels.astype(np.uint8)).save(out / rel, quality=90)
            text = f"a {rng.choice(words)} plate of {dish}"
            label: str | list[str] = dish
            if multilabel:
                label = [dish]
                if i % 2 == 0:
                    label.append(IMAGE_TEXT_CLASSES[(c + 1) % len(IMAGE_TEXT_CLASSES)])
                    text += f" with {label[1]}"
            lines.append(json.dumps({"image": rel, "text": text, "label": label}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out
