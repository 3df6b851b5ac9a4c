"""AudioVisualClips loader throughput: decoding every clip at every step vs the cache.

``python benchmarks/loader_throughput.py [--clips N] [--frames T] [--image-size S]`` (part of
``make bench``) generates ``N`` clips with CREMA-D's sizes (three 480x360 JPEG frames at 1 fps,
2.5 s of 16 kHz 16-bit audio), then times one pass of the training loader over them:

- raw: ``RawClips`` decodes the JPEGs, resizes, reads the WAV, resamples, runs ``torch.stft`` per
  sample (what OGM-GE's loaders do every epoch);
- cached: the DataModule's train loader over ``prepare_data``'s uint8/float16 memory maps.

Both with 2 workers and with all cores. Prints a table and writes
``benchmarks/results/loader_<host kind>.json``. Target: cached >= 5x raw. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mmlearn.batch import collate_multimodal
from mmlearn.data import AudioVisualClips
from mmlearn.data.av_clips import RawClips
from mmlearn.data.fixtures import write_av_clips


def samples_per_s(loader: DataLoader, n: int) -> float:
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += int(batch.target.shape[0])
    assert seen == n, (seen, n)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=240)
    parser.add_argument("--frames", type=int, default=2, help="frames per clip fed to the model")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loader workers are the parallelism being measured
    out: dict = {"host": platform.node(), "cpus": os.cpu_count(), **vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_av_clips(
            tmp,
            n_train=args.clips,
            n_test=6,
            frames=3,
            frame_size=(480, 360),
            seconds=2.5,
            rate=16000,
        )
        out["generate_s"] = time.perf_counter() - start
        workers = sorted({2, os.cpu_count() or 2})
        dm = AudioVisualClips(
            root=tmp,
            num_frames=args.frames,
            image_size=args.image_size,
            val_fraction=0.05,
            prepare_workers=max(workers),
            batch_size=args.batch_size,
            seed=0,
        )
        start = time.perf_counter()
        dm.prepare_data()
        out["prepare_s"] = time.perf_counter() - start
        train = dm.clip_lists()["train"]
        for w in workers:
            raw = DataLoader(
                RawClips(dm.decoder, train),
                batch_size=args.batch_size,
                num_workers=w,
                collate_fn=collate_multimodal,
            )
            dm.num_workers = w
            cached = dm.train_dataloader()
            # the cached loader's first pass also faults the pages in: time the second
            samples_per_s(cached, len(train))
            row = {
                "workers": w,
                "raw": samples_per_s(raw, len(train)),
                "cached": samples_per_s(cached, len(train)),
            }
            row["speedup"] = row["cached"] / row["raw"]
            out["runs"].append(row)
    print(
        f"\nAudioVisualClips loader, {len(train)} clips of CREMA-D's size "
        f"({args.frames} x 3 x {args.image_size}^2 frames + [1, 257, 188] spectrogram); "
        f"cache built once in {out['prepare_s']:.1f} s"
    )
    print("| workers | raw (samples/s) | cached (samples/s) | cached / raw |")
    print("|---|---|---|---|")
    for r in out["runs"]:
        print(f"| {r['workers']} | {r['raw']:.0f} | {r['cached']:.0f} | {r['speedup']:.1f}x |")
    path = (
        Path(__file__).parent
        / "results"
        / f"loader_{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    )
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
