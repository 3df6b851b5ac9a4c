"""Image + text classification from JSONL (UPMC Food-101, MM-IMDb, Hateful Memes style).

Layout (``<root>/<name>/``)::

    train.jsonl, test.jsonl [, val.jsonl]   one JSON object per line, e.g.
        {"image": "images/123.jpg", "text": "a bowl of pho", "label": "pho"}
    images/...                              paths in the records are relative to <name>/

The keys are configurable (Hateful Memes: ``image_key: img``). Like ``AudioVisualClips``, the
first use (``prepare_data``) decodes every image once (resized to ``image_size``, uint8) and
tokenises every text with a ``transformers`` tokenizer (``max_length``, padded with 0) into
``<name>/cache/`` memory maps (:mod:`mmlearn.data.cache`). Pair the ``text`` modality
with the ``hf`` encoder (``pretrained: minilm``: the offline all-MiniLM-L6-v2, whose tokenizer is
the default here) and ``image`` with ``cnn`` or ``resnet18``. The records and images are your own
(nothing fetches them); :func:`write_image_text` writes the layout in miniature.

Multi-label tasks (MM-IMDb's genres) give ``label`` as a list: when any training record does, the
data is multi-label (``multilabel`` is linked to the model: sigmoid heads, binary cross-entropy,
multi-hot targets ``[N, K]``), and every record's label must be a list (possibly empty).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import register_type
from torch.utils.data import Dataset

from mmlearn.data.cache import CachedDataModule, SplitPlan
from mmlearn.data.paths import PathArg, resolve_config_path
from mmlearn.errors import MMLearnError

#: tokenizers known by name (any other value is a local directory)
TOKENIZER_NAMES = ("minilm",)


class TokenizerArg(str):
    """``tokenizer``: a name from :data:`TOKENIZER_NAMES`, kept as it is, or a directory, read as
    every path in a config is (relative to the file that contains it)."""


def _tokenizer_arg(value: str | os.PathLike[str]) -> TokenizerArg:
    text = os.fspath(value)
    return TokenizerArg(text if text in TOKENIZER_NAMES else resolve_config_path(text))


register_type(TokenizerArg, serializer=str, deserializer=_tokenizer_arg)

# image path, text, label(s), "file:line" (for errors)
Record = tuple[str, str, str | tuple[str, ...], str]


def read_jsonl(path: Path, image_key: str, text_key: str, label_key: str) -> list[Record]:
    """``[(image, text, label, where)]`` from one JSONL file, every line checked."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    out: list[Record] = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MMLearnError(f"{where}: not JSON ({e.msg})") from e
        missing = [k for k in (image_key, text_key, label_key) if k not in rec]
        if missing:
            raise MMLearnError(f"{where}: keys {missing} missing; the record has {sorted(rec)}")
        label = rec[label_key]
        labels: str | tuple[str, ...] = (
            tuple(str(v) for v in label) if isinstance(label, list) else str(label)
        )
        out.append((str(rec[image_key]), str(rec[text_key]), labels, where))
    if not out:
        raise MMLearnError(f"{path}: no records")
    return out


def load_tokenizer(name: str) -> Any:
    """A local ``transformers`` tokenizer: ``minilm`` (the offline package) or a directory."""
    from transformers import AutoTokenizer

    from mmlearn.encoders.huggingface import minilm_path

    path = minilm_path() if name == "minilm" else Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer {name!r}: {path} is not a directory")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class _Images(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, folder: Path, records: list[Record], size: int) -> None:
        self.folder, self.records, self.size = folder, records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError

        image, _, _, where = self.records[i]
        path = self.folder / image
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((self.size, self.size))
        except FileNotFoundError as e:
            raise MMLearnError(f"{where}: image {path} not found") from e
        except (UnidentifiedImageError, OSError) as e:
            raise MMLearnError(f"{where}: unreadable image {path} ({e})") from e
        return {"image": torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)}


class ImageText(CachedDataModule):
    """``image`` ``[3, S, S]`` (uint8, scaled on the device) and ``text`` token ids ``[L]``.

    Args:
        name: the dataset folder under ``root``.
        root: the data directory; ``None``: ``$MMLEARN_DATA`` or ``./data``. In a config,
            relative to that file.
        image_key, text_key, label_key: the record keys.
        classes: label names in index order; ``None``: the sorted labels of ``train.jsonl``
            (saved in the run's config).
        image_size: side of the resized images.
        tokenizer: ``minilm`` or a local tokenizer directory (in a config, relative to that file).
        max_length: tokens per text (truncated / padded with 0).
        val_fraction: without ``val.jsonl``, this share of train (stratified, ``seed``).
        prepare_workers: processes decoding images when the cache is built.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the validation split and the shuffling (``None``: ``seed_everything``).
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        name: str = "image-text",
        root: PathArg | None = None,
        image_key: str = "image",
        text_key: str = "text",
        label_key: str = "label",
        classes: list[str] | None = None,
        image_size: int = 224,
        tokenizer: TokenizerArg | str = "minilm",
        max_length: int = 64,
        val_fraction: float = 0.1,
        prepare_workers: int = 2,
        batch_size: int = 32,
        num_workers: int = 2,
        seed: int | None = None,
        predict_split: str = "test",
        modality_dropout: float | dict[str, float] = 0.0,
        modality_dropout_fill: str = "mean",
        train_fraction: float = 1.0,
    ) -> None:
        super().__init__(
            name,
            root,
            val_fraction,
            prepare_workers,
            batch_size,
            num_workers,
            seed,
            predict_split,
            modality_dropout=modality_dropout,
            modality_dropout_fill=modality_dropout_fill,
            train_fraction=train_fraction,
        )
        self.keys = (image_key, text_key, label_key)
        self.classes = list(classes) if classes is not None else None
        self.image_size, self.tokenizer, self.max_length = image_size, tokenizer, max_length
        self._train: list[Record] | None = None

    @property
    def modalities(self) -> list[str]:
        return ["image", "text"]

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return {"image": [3, self.image_size, self.image_size], "text": [self.max_length]}

    def _train_records(self) -> list[Record]:
        if self._train is None:
            self._train = read_jsonl(self.folder / "train.jsonl", *self.keys)
        return self._train

    @property
    def multilabel(self) -> bool:
        return any(isinstance(r[2], tuple) for r in self._train_records())

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            found: set[str] = set()
            for _, _, label, _ in self._train_records():
                found |= set(label) if isinstance(label, tuple) else {label}
            self.classes = sorted(found)
        return len(self.classes)

    def records(self) -> dict[str, list[tuple[Record, list[int]]]]:
        """``{split: [(record, label indices)]}``; val from ``val.jsonl`` or split off train."""
        self.num_classes  # noqa: B018  (fixes the class list)
        assert self.classes is not None
        index = {c: i for i, c in enumerate(self.classes)}
        multi = self.multilabel
        out: dict[str, list[tuple[Record, list[int]]]] = {}
        for split in ("train", "val", "test"):
            path = self.folder / f"{split}.jsonl"
            if split == "val" and not path.is_file():
                continue
            items = []
            for rec in read_jsonl(path, *self.keys):
                if isinstance(rec[2], tuple) != multi:
                    want = "a list of labels" if multi else "one label"
                    raise MMLearnError(
                        f"{rec[3]}: label {rec[2]!r}; this data has {want} per record (as in "
                        "train.jsonl)"
                    )
                labels = rec[2] if isinstance(rec[2], tuple) else (rec[2],)
                unknown = [lab for lab in labels if lab not in index]
                if unknown:
                    raise MMLearnError(
                        f"{rec[3]}: label {unknown[0]!r} is not among the classes "
                        f"{self.classes[:20]}"
                    )
                items.append((rec, [index[lab] for lab in labels]))
            out[split] = items
        # stratified by the (first) label; a multi-label record without labels counts as 0
        self.split_off_val(out, [ys[0] if ys else 0 for _, ys in out["train"]])
        return out

    def cache_meta(self) -> dict[str, Any]:
        recs = self.records()
        return {
            "keys": list(self.keys),
            "classes": self.classes,
            "image_size": self.image_size,
            "tokenizer": self.tokenizer,
            "max_length": self.max_length,
            "records": {s: [[r[3], ys] for r, ys in v] for s, v in recs.items()},
        }

    def cache_plan(self) -> dict[str, SplitPlan]:
        tok = load_tokenizer(self.tokenizer)
        plans = {}
        for split, items in self.records().items():
            recs = [r for r, _ in items]
            ids = tok(
                [r[1] for r in recs],
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="np",
            )["input_ids"]
            labels: np.ndarray
            if self.multilabel:  # multi-hot [N, K]
                labels = np.zeros((len(items), self.num_classes), np.float32)
                for i, (_, ys) in enumerate(items):
                    labels[i, ys] = 1.0
            else:
                labels = np.array([ys[0] for _, ys in items], dtype=np.int64)
            plans[split] = SplitPlan(
                _Images(self.folder, recs, self.image_size),
                {"image": ([3, self.image_size, self.image_size], np.uint8)},
                {"text": ids.astype(np.int64), "labels": labels},
            )
        return plans


# ---- the layout in miniature (tests, examples; the index is mmlearn.data.fixtures) ----------
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
