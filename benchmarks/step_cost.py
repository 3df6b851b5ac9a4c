"""Step cost of every strategy relative to the reference, measured interleaved over rounds.

``python benchmarks/step_cost.py [--size cpu|gpu] [--rounds R] [--steps N]`` (``make bench``)
prints a table and writes ``benchmarks/results/step_cost_<size>.json``. Not a test: it measures.

The reference is ``LateFusionHeads`` (InterOnly with unimodal heads on the same encoders,
automatic optimisation of the plain sum), the model every gradient-level strategy trains.

A noisy machine moves single timings by 2x, so nothing is compared across minutes: in every
round each strategy trains ``--steps`` steps inside a real Lightning ``Trainer`` (a callback
times ``on_train_batch_start`` -> ``on_train_batch_end`` after warm-up), the strategies in a
rotated order with the reference timed between every two of them, and each ratio is taken
against the mean of the reference timings just before and just after it. The table gives the
median ratio over rounds and its spread (min-max), plus:

- raw loop: the same InterOnly model trained by a plain PyTorch loop (forward, CE, backward,
  SGD step): framework / raw is Lightning's and mmlearn's own overhead;
- weight time: each rule's per-step weight computation on the model's real gradient rows
  (MIMO's softmax over M losses; MGDA's Gramian and min-norm solve, global and per group;
  BOGC's evidence and fusion on the EMA variance), as a share of that strategy's step;
- peak memory (``torch.cuda.max_memory_allocated``) on GPU.

Sizes: ``cpu``: 2 modalities of 1024 features, MLP encoders 1024 -> 1024 -> 512, batch 256.
``gpu``: ResNet-18 audio ``[1, 257, 188]`` + ResNet-18 visual ``[3, 224, 224]``, batch 64,
bf16-mixed, channels_last (the imbalance papers' audio-visual setting).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmlearn.batch import MultimodalBatch
from mmlearn.gradients import MGDA, Block, BOGCCalibration, Sum, evidence, gramian
from mmlearn.gradients.mgda import min_norm_weights, row_gram
from mmlearn.gradients.torchjd import TorchJD
from mmlearn.gradients.torchjd import available as torchjd_available
from mmlearn.runtime import keep_freed_memory
from mmlearn.strategies import (
    BOGC,
    I2M2,
    MIMO,
    MLA,
    OGMGE,
    EMAMoments,
    InterOnly,
    IntraOnly,
    LastLayer,
    LateFusionHeads,
    Microbatch,
    MMPareto,
    MultiObjective,
)

SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "shapes": {"audio": [1024], "visual": [1024]},
        "batch": 256,
        "embed": 512,
        "encoders": {
            "audio": {"name": "mlp", "hidden": [1024]},
            "visual": {"name": "mlp", "hidden": [1024]},
        },
        "precision": "32-true",
    },
    "gpu": {
        "shapes": {"audio": [1, 257, 188], "visual": [3, 224, 224]},
        "batch": 64,
        "embed": 512,
        "encoders": {"audio": {"name": "resnet18"}, "visual": {"name": "resnet18"}},
        "precision": "bf16-mixed",
    },
}
REF = "LateFusionHeads (ref)"
STRATEGIES: dict[str, Callable[[], tuple[type, dict[str, Any]]]] = {
    REF: lambda: (LateFusionHeads, {}),
    "InterOnly": lambda: (InterOnly, {}),
    "IntraOnly": lambda: (IntraOnly, {}),
    "I2M2": lambda: (I2M2, {}),
    "MIMO": lambda: (MIMO, {}),
    "Sum (manual step)": lambda: (MultiObjective, {"rule": Sum()}),
    "MGDA global": lambda: (MultiObjective, {"rule": MGDA()}),
    "MGDA per_group": lambda: (MultiObjective, {"rule": MGDA(scope="per_group")}),
    "MGDA every=10": lambda: (MultiObjective, {"rule": MGDA(), "every": 10}),
    "BOGC ema": lambda: (BOGC, {}),
    "BOGC microbatch(4)": lambda: (BOGC, {"moments": Microbatch(4)}),
    "BOGC last_layer": lambda: (BOGC, {"moments": LastLayer()}),
    "OGM-GE": lambda: (OGMGE, {}),
    "MMPareto": lambda: (MMPareto, {}),
    "MLA (M steps a batch)": lambda: (MLA, {}),
    "UPGrad (TorchJD, global)": lambda: (MultiObjective, {"rule": TorchJD("UPGrad")}),
    "PCGrad (TorchJD, global)": lambda: (MultiObjective, {"rule": TorchJD("PCGrad")}),
}
if not torchjd_available():  # the optional torchjd extra
    del STRATEGIES["UPGrad (TorchJD, global)"], STRATEGIES["PCGrad (TorchJD, global)"]
#: strategies that cannot run at a size (Microbatch refuses BatchNorm encoders)
SKIP = {"gpu": {"BOGC microbatch(4)"}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Wall time of every training step after ``warmup`` steps, in seconds."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.t0 = warmup, [], 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        sync()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        sync()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)


class RandomData(pl.LightningDataModule):
    """Pre-built batches: the loader costs nothing, the step is what is timed."""

    def __init__(self, shapes: dict[str, list[int]], batch: int, steps: int, k: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.batches = [
            MultimodalBatch(
                {m: torch.randn(batch, *s, generator=g) for m, s in shapes.items()},
                torch.randint(0, k, (batch,), generator=g),
            )
            for _ in range(steps)
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda b: b)


def build(cls: type, kw: dict[str, Any], size: dict[str, Any]) -> pl.LightningModule:
    torch.manual_seed(0)
    model = cls(
        input_shapes=size["shapes"],
        num_classes=10,
        embed_dim=size["embed"],
        encoders=size["encoders"],
        head_hidden=None if cls.linear_fused_head else size["embed"],
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        **kw,
    )
    if size is SIZES["gpu"]:
        model = model.to(memory_format=torch.channels_last)
    return model


def time_steps(
    model: pl.LightningModule, data: RandomData, warmup: int, device: str, precision: str
) -> tuple[float, float | None]:
    """Median step (ms) of one fit over ``data``, and the peak GPU memory (MiB)."""
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        max_steps=len(data.batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        precision=precision,  # type: ignore[arg-type]
    )
    if device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=data)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "gpu" else None
    return 1e3 * statistics.median(timer.times), peak


def raw_steps(model: torch.nn.Module, data: RandomData, warmup: int, device: str) -> float:
    """InterOnly trained by hand: zero_grad, forward, CE, backward, SGD step. Median ms."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    times = []
    for i, b in enumerate(data.batches):
        inputs = {m: x.to(dev, non_blocking=True) for m, x in b.inputs.items()}
        target = b.target.to(dev, non_blocking=True)
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(dev.type, torch.bfloat16, enabled=device == "gpu"):
            loss = F.cross_entropy(model.joint(inputs), target)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def weight_times(size: dict[str, Any], device: str, repeats: int = 20) -> dict[str, float]:
    """Each rule's weight computation (ms) on one real set of the reference model's rows."""
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = build(MultiObjective, {"moments": EMAMoments()}, size).to(dev)
    data = RandomData(size["shapes"], size["batch"], 2).batches
    rows, var = {}, {}
    for b in data:  # two steps: the EMA has a non-zero variance
        batch = MultimodalBatch({m: x.to(dev) for m, x in b.inputs.items()}, b.target.to(dev))
        _, losses, stats = model.moments.local(model, batch)
        rows, var = model.moments.finish(stats, 1)
    uni = torch.stack([losses[m].detach() for m in model.modalities])
    names = model.objective_names

    def clock(fn: Callable[[], object]) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return 1e3 * (time.perf_counter() - t0) / repeats

    shared = [g for g in model.groups if len(g.objectives) > 1]
    blocks = [Block(rows[g.name], tuple(names.index(k) for k in g.objectives)) for g in shared]
    mu = [rows[g.name] for g in shared]
    vs = [var[g.name] for g in shared]
    w_mgda = [torch.full((len(g.objectives),), 0.5, device=dev) for g in shared]
    w_bogc = [BOGCCalibration()(m, v)[1] for m, v in zip(mu, vs, strict=True)]

    def bogc_weights() -> None:
        for v in vs:  # the weights w = (e + 1/n) / (S + 1), without the weighted sum
            e = evidence(v).add_(1.0 / v.shape[0])
            e /= e.sum(0, keepdim=True)

    # the weights alone, then applying them to the rows (which Sum's plain sum also costs)
    return {
        "MIMO": clock(lambda: torch.softmax(uni / 0.5, 0)),
        "MGDA global": clock(lambda: min_norm_weights(gramian(blocks)[0])),
        "MGDA per_group": clock(lambda: [min_norm_weights(row_gram(m)) for m in mu]),
        "BOGC ema": clock(bogc_weights),
        "apply MGDA": clock(lambda: [w @ m for w, m in zip(w_mgda, mu, strict=True)]),
        "apply BOGC": clock(lambda: [(w * m).sum(0) for w, m in zip(w_bogc, mu, strict=True)]),
        "apply Sum": clock(lambda: [m.sum(0) for m in mu]),
    }


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="cpu", choices=sorted(SIZES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=12, help="steps per strategy per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (the mmlearn command keeps freed memory)",
    )
    args = p.parse_args()
    if not args.default_malloc:
        keep_freed_memory()
    size = SIZES[args.size]
    device = "gpu" if args.size == "gpu" else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--size gpu needs CUDA")
    names = [n for n in STRATEGIES if n not in SKIP.get(args.size, set())]
    models = {n: build(*STRATEGIES[n](), size) for n in names}
    raw_model = build(InterOnly, {}, size).to("cuda" if device == "gpu" else "cpu")
    data = RandomData(size["shapes"], size["batch"], args.steps)
    ms: dict[str, list[float]] = {n: [] for n in [*names, "raw loop"]}
    ratio: dict[str, list[float]] = {n: [] for n in ms}
    peak: dict[str, float | None] = {}

    def ref_now() -> float:
        t = time_steps(models[REF], data, args.warmup, device, size["precision"])[0]
        ms[REF].append(t)
        return t

    for r in range(args.rounds):
        others = [n for n in names if n != REF]
        order = others[r % len(others) :] + others[: r % len(others)]
        before = ref_now()
        for n in [*order, "raw loop"]:
            if n == "raw loop":
                t = raw_steps(raw_model, data, args.warmup, device)
            else:
                t, mem = time_steps(models[n], data, args.warmup, device, size["precision"])
                peak.setdefault(n, mem)
            after = ref_now()
            ms[n].append(t)
            # against the reference measured just before and just after: a noisy minute
            # moves both, not the ratio
            ratio[n].append(t / (0.5 * (before + after)))
            before = after
        print(f"round {r + 1}/{args.rounds}: ref {statistics.median(ms[REF]):.1f} ms", flush=True)
    ratio[REF] = [1.0]
    peak.setdefault(REF, time_steps(models[REF], data, args.warmup, device, size["precision"])[1])
    framework = [a / b for a, b in zip(ratio["InterOnly"], ratio["raw loop"], strict=True)]
    wt = weight_times(size, device)
    step_of = {k: statistics.median(ms[k]) for k in wt if k in ms}
    print(
        f"\nstep cost, size={args.size}, batch {size['batch']}, {size['precision']}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"{args.rounds} interleaved rounds of {args.steps - args.warmup} timed steps\n"
    )
    print("| strategy | step ms (median) | x ref: median [min-max] | peak MiB |")
    print("|---|---|---|---|")
    for n in ms:
        mem = f"{peak[n]:.0f}" if peak.get(n) is not None else "-"
        print(f"| {n} | {statistics.median(ms[n]):.1f} | {spread(ratio[n])} | {mem} |")
    print(f"\nframework / raw loop (InterOnly): {spread(framework)}")
    print("\nper step, on the real rows: each rule's weights alone, then applying weights:")
    for k, v in wt.items():
        share = f" = {100 * v / step_of[k]:.1f}% of its step" if k in step_of else ""
        print(f"  {k}: {v:.3f} ms{share}")
    out = Path(__file__).parent / "results" / f"step_cost_{args.size}.json"
    out.parent.mkdir(exist_ok=True)
    result = {
        "size": args.size,
        "batch": size["batch"],
        "precision": size["precision"],
        "rounds": args.rounds,
        "timed_steps_per_round": args.steps - args.warmup,
        "device": torch.cuda.get_device_name() if device == "gpu" else platform.processor(),
        "threads": torch.get_num_threads(),
        "keep_freed_memory": not args.default_malloc,
        "step_ms": ms,
        "ratio_to_ref": ratio,
        "framework_over_raw": framework,
        "peak_mib": peak,
        "weight_ms": wt,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
