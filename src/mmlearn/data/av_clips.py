"""Audio-visual clips (CREMA-D, Kinetics-Sounds) in the layout the OGM-GE / MMPareto line prepares.

OGM-GE (Peng et al., CVPR 2022) and MMPareto (Wei and Hu, ICML 2024) read, per dataset::

    <root>/<name>/train.csv, test.csv [, val.csv]   rows ``clip,label`` (a header row is optional)
    <root>/<name>/visual/Image-01-FPS/<clip>/*.jpg  frames extracted at 1 frame per second
    <root>/<name>/audio/<clip>.wav                  the clip's sound (PCM WAV)

Decoding JPEGs and computing spectrograms at every step starves a GPU, so the first use (Lightning's
``prepare_data``, once per node; or ``mmlearn prepare crema-d``) decodes every clip once into
``<name>/cache/`` (:mod:`mmlearn.data.cache`): ``<split>_visual.npy`` (uint8 ``[N, T, 3, S, S]``),
``<split>_audio.npy`` (float16 log-magnitude spectrograms ``[N, 1, F, W]`` from ``torch.stft``),
``<split>_labels.npy``. Training memory-maps those arrays.
The clips themselves cannot be fetched (they come as videos from each dataset's own site, and
the frames must be extracted first): without ``<name>/train.csv`` loading is an error naming the
folder and the layout. :func:`write_av_clips` writes the layout in miniature.
The spectrogram follows OGM-GE: the waveform resampled to 22,050 Hz, tiled/cut to 3 s, STFT with
n_fft 512 and hop 353 (Hann window), ``log(|X| + 1e-7)`` -> ``[1, 257, 188]``.
"""

from __future__ import annotations

import csv
import math
import os
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmlearn.data.cache import CachedDataModule, SplitPlan
from mmlearn.data.paths import PathArg
from mmlearn.errors import MMLearnError

CREMA_D_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # OGM-GE's index order


def read_clip_list(path: Path) -> list[tuple[str, str]]:
    """``[(clip, label), ...]`` from a ``clip,label`` CSV (a ``clip,label`` header is skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"clip list {path} not found")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["clip", "label"], ["id", "label"]):
        rows = rows[1:]
    out = []
    for i, row in enumerate(rows):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise MMLearnError(f"{path}: line {i + 1} is {row!r}; expected `clip,label`")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise MMLearnError(f"{path}: no clips listed")
    return out


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Mono float waveform in [-1, 1] and its sample rate, from a PCM WAV (8/16/32-bit)."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise MMLearnError(f"{path}: unreadable WAV ({e})") from e
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise MMLearnError(f"{path}: {8 * width}-bit samples; expected 8, 16 or 32-bit PCM")
    x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
    if x.size == 0:
        raise MMLearnError(f"{path}: the WAV holds no samples")
    return torch.from_numpy(x.reshape(-1, channels).mean(1)), rate


class ClipDecoder:
    """Decodes one clip: ``num_frames`` evenly spaced JPEG frames and a log spectrogram.

    Output: frames uint8 ``[T, 3, S, S]``, spectrogram float32 ``[1, n_fft // 2 + 1, W]``.
    """

    def __init__(
        self,
        folder: Path,
        frames_dir: str = "visual/Image-01-FPS",
        audio_dir: str = "audio",
        num_frames: int = 1,
        image_size: int = 224,
        sample_rate: int = 22050,
        seconds: float = 3.0,
        n_fft: int = 512,
        hop_length: int = 353,
    ) -> None:
        self.folder, self.frames_dir, self.audio_dir = folder, frames_dir, audio_dir
        self.num_frames, self.image_size = num_frames, image_size
        self.sample_rate, self.seconds = sample_rate, seconds
        self.samples = int(round(seconds * sample_rate))
        self.n_fft, self.hop_length = n_fft, hop_length

    @property
    def settings(self) -> dict[str, Any]:
        """Everything decoding depends on (what the cache's ``meta.json`` records)."""
        keys = (
            "frames_dir",
            "audio_dir",
            "num_frames",
            "image_size",
            "sample_rate",
            "seconds",
            "n_fft",
            "hop_length",
        )
        return {k: getattr(self, k) for k in keys}

    @property
    def shapes(self) -> dict[str, list[int]]:
        width = 1 + self.samples // self.hop_length
        return {
            "visual": [self.num_frames, 3, self.image_size, self.image_size],
            "audio": [1, self.n_fft // 2 + 1, width],
        }

    def frames(self, clip: str) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        folder = self.folder / self.frames_dir / clip
        files = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png"))
        if not files:
            raise MMLearnError(f"clip {clip!r}: no frames (*.jpg) in {folder}")
        pick = np.linspace(0, len(files) - 1, self.num_frames).round().astype(int)
        out = torch.empty(self.num_frames, 3, self.image_size, self.image_size, dtype=torch.uint8)
        for t, i in enumerate(pick):
            try:
                with Image.open(files[i]) as img:
                    rgb = img.convert("RGB").resize((self.image_size, self.image_size))
            except (UnidentifiedImageError, OSError) as e:
                raise MMLearnError(f"clip {clip!r}: unreadable image {files[i]} ({e})") from e
            out[t] = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        return out

    def spectrogram(self, clip: str) -> torch.Tensor:
        path = self.folder / self.audio_dir / f"{clip}.wav"
        if not path.is_file():
            raise MMLearnError(f"clip {clip!r}: no audio file {path}")
        x, rate = read_wav(path)
        if rate != self.sample_rate:  # linear resampling (OGM-GE resamples to 22,050 Hz)
            n = max(1, int(round(len(x) * self.sample_rate / rate)))
            x = torch.nn.functional.interpolate(x[None, None], size=n, mode="linear")[0, 0]
        x = x.repeat(math.ceil(self.samples / len(x)))[: self.samples]  # tile short clips
        spec = torch.stft(
            x,
            self.n_fft,
            self.hop_length,
            window=torch.hann_window(self.n_fft),
            return_complex=True,
        )
        return torch.log(spec.abs() + 1e-7)[None]


class RawClips(Dataset[tuple[dict[str, torch.Tensor], int]]):
    """Decodes every sample when it is read (the uncached path; ``prepare`` and benchmarks)."""

    def __init__(self, decoder: ClipDecoder, clips: Sequence[tuple[str, int]]) -> None:
        self.decoder, self.clips = decoder, list(clips)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        clip, label = self.clips[i]
        visual = self.decoder.frames(clip)
        audio = self.decoder.spectrogram(clip).half()
        return {"visual": visual, "audio": audio}, label


class AudioVisualClips(CachedDataModule):
    """CREMA-D / Kinetics-Sounds style clips: ``visual`` frames and ``audio`` spectrogram.

    Encoders: ``resnet18`` for both (set in ``data_modules/crema_d.yaml``), as in OGM-GE.

    Args:
        name: the dataset folder under ``root`` (``crema-d``, ``kinetics-sounds``, ...).
        root: the data directory; ``None``: ``$MMLEARN_DATA`` or ``./data``. In a config,
            relative to that file.
        classes: label names in index order; ``None``: CREMA-D's order when the labels are
            CREMA-D's, else the sorted labels of ``train.csv``.
        frames_dir, audio_dir: sub-folders of the frames (``<clip>/*.jpg``) and the ``.wav``,
            inside the dataset folder (names in its layout, not paths relative to a config).
        num_frames, image_size: frames per clip (evenly spaced) and their side after resizing.
        sample_rate, seconds, n_fft, hop_length: the spectrogram (OGM-GE's defaults).
        val_fraction: without a ``val.csv``, this share of ``train.csv`` (stratified, ``seed``).
        prepare_workers: processes decoding clips when the cache is built.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the validation split and the shuffling (``None``: ``seed_everything``).
        modality_dropout, modality_dropout_fill, train_fraction: the options every DataModule
            has (:class:`~mmlearn.data.base.MultimodalDataModule`; docs/datasets.md).
    """

    def __init__(
        self,
        name: str = "crema-d",
        root: PathArg | None = None,
        classes: list[str] | None = None,
        frames_dir: str = "visual/Image-01-FPS",
        audio_dir: str = "audio",
        num_frames: int = 1,
        image_size: int = 224,
        sample_rate: int = 22050,
        seconds: float = 3.0,
        n_fft: int = 512,
        hop_length: int = 353,
        val_fraction: float = 0.1,
        prepare_workers: int = 2,
        batch_size: int = 64,
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
        self.decoder = ClipDecoder(
            self.folder,
            frames_dir,
            audio_dir,
            num_frames,
            image_size,
            sample_rate,
            seconds,
            n_fft,
            hop_length,
        )
        self._classes = list(classes) if classes is not None else None

    # ---- what is known before any clip is decoded ----------------------------------------
    @property
    def modalities(self) -> list[str]:
        return ["visual", "audio"]

    @property
    def input_shapes(self) -> dict[str, list[int]]:
        return self.decoder.shapes

    def _train_list(self) -> Path:
        """``<folder>/train.csv``, or an error saying the clips are not there and why."""
        path = self.folder / "train.csv"
        if not path.is_file():
            raise FileNotFoundError(
                f"AudioVisualClips: {path} not found; the {self.folder.name} clips cannot be "
                "fetched (they come as videos from the dataset's own site): put them in "
                f"{self.folder} in the OGM-GE layout (train.csv, test.csv, "
                f"{self.decoder.frames_dir}/<clip>/*.jpg at 1 fps, {self.decoder.audio_dir}/"
                "<clip>.wav); `mmlearn fit` (prepare_data) then decodes them once into "
                f"{self.cache}"
            )
        return path

    @property
    def classes(self) -> list[str]:
        """Label names in index order (read from ``train.csv`` unless given)."""
        if self._classes is None:
            labels = sorted({lab for _, lab in read_clip_list(self._train_list())})
            self._classes = CREMA_D_CLASSES if set(labels) <= set(CREMA_D_CLASSES) else labels
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def clip_lists(self) -> dict[str, list[tuple[str, int]]]:
        """``{split: [(clip, label index)]}``; val from ``val.csv`` or split off ``train.csv``."""
        index = {c: i for i, c in enumerate(self.classes)}
        lists = {}
        for split in ("train", "val", "test"):
            path = self._train_list() if split == "train" else self.folder / f"{split}.csv"
            if split == "val" and not path.is_file():
                continue
            rows = read_clip_list(path)
            for line, (clip, label) in enumerate(rows):
                if label not in index:
                    raise MMLearnError(
                        f"{path}: clip {clip!r} (line {line + 1}) has label "
                        f"{label!r}, not in the classes {self.classes}"
                    )
            lists[split] = [(clip, index[label]) for clip, label in rows]
        self.split_off_val(lists, [y for _, y in lists["train"]])
        return lists

    # ---- the cache ---------------------------------------------------------------------------
    def cache_meta(self) -> dict[str, Any]:
        lists = self.clip_lists()
        return {
            **self.decoder.settings,
            "classes": self.classes,
            "clips": {s: [[c, y] for c, y in v] for s, v in lists.items()},
        }

    def cache_plan(self) -> dict[str, SplitPlan]:
        shapes = self.decoder.shapes
        layout = {"visual": (shapes["visual"], np.uint8), "audio": (shapes["audio"], np.float16)}
        return {
            split: SplitPlan(
                RawClips(self.decoder, clips),
                layout,
                {"labels": np.array([y for _, y in clips], dtype=np.int64)},
            )
            for split, clips in self.clip_lists().items()
        }


def prepare_av_clips(root: str | os.PathLike[str], name: str = "crema-d") -> Path:
    """``mmlearn prepare crema-d|kinetics-sounds``: build the cache with the default settings.

    Args:
        root: the data directory holding ``<name>/``.
        name: the dataset folder.

    Returns:
        The cache folder, ``root/<name>/cache``.
    """
    dm = AudioVisualClips(name=name, root=root)
    dm.prepare_data()
    return dm.cache


# ---- the layout in miniature (tests, examples; the index is mmlearn.data.fixtures) ----------
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
