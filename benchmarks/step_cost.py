"""Step cost of every strategy relative to InterOnly-with-unimodal-heads, and weight-solve times.

``python benchmarks/step_cost.py [--size cpu|gpu] [--steps N]`` (``make bench``) prints a table
and writes ``benchmarks/results/step_cost_<size>.json``. Not a test: it measures.

- step time: median wall time of a training step inside a real Lightning ``Trainer`` (a callback
  times ``on_train_batch_start`` -> ``on_train_batch_end``), after warm-up steps;
- raw loop: the same InterOnly model trained by a plain PyTorch loop, to expose the framework's own
  overhead (target <= 1.05x);
- weight time: the time to compute the per-step combination weights on the SAME gradient matrix:
  MIMO's softmax over M losses, MGDA's min-norm solve, BOGC's calibration (EMA + evidence + fusion);
- peak memory: ``torch.cuda.max_memory_allocated`` on GPU; not measured on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmlearn.batch import MultimodalBatch
from mmlearn.gradients import MGDA, BOGCCalibration, Sum
from mmlearn.strategies import BOGC, I2M2, MIMO, InterOnly, IntraOnly, MultiObjective
from mmlearn.strategies import _jacobian as jac

SIZES = {
    # 2 modalities of 1024 features, MLP encoders 1024 -> 1024 -> 512, batch 256
    "cpu": {
        "shapes": {"audio": [1024], "visual": [1024]},
        "batch": 256,
        "embed": 512,
        "encoders": {
            "audio": {"name": "mlp", "hidden": [1024]},
            "visual": {"name": "mlp", "hidden": [1024]},
        },
    },
}
STRATEGIES = {
    "InterOnly+heads (ref)": (MultiObjective, {}),
    "InterOnly": (InterOnly, {}),
    "IntraOnly": (IntraOnly, {}),
    "I2M2": (I2M2, {}),
    "MIMO": (MIMO, {}),
    "Sum (Jacobian path)": (MultiObjective, {"rule": Sum()}),
    "MGDA": (MultiObjective, {"rule": MGDA()}),
    "BOGC ema": (BOGC, {}),
    "BOGC microbatch(4)": (BOGC, {"variance": "microbatch", "n_chunks": 4}),
    "BOGC last_layer": (BOGC, {"variance": "last_layer"}),
}


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.t0 = warmup, [], 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, *args) -> None:
        self._sync()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        self._sync()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)


class RandomData(pl.LightningDataModule):
    def __init__(self, shapes, batch: int, steps: int, k: int = 10) -> None:
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
        # pre-built batches: the loader costs nothing, the step is what is timed
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda b: b)


def build(cls, kw, size):
    torch.manual_seed(0)
    return cls(
        input_shapes=size["shapes"],
        num_classes=10,
        embed_dim=size["embed"],
        encoders=size["encoders"],
        head_hidden=size["embed"],
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        **kw,
    )


def time_strategy(cls, kw, size, steps: int, warmup: int, device: str) -> dict:
    model = build(cls, kw, size)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        precision="bf16-mixed" if device == "gpu" else "32-true",
    )
    if device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=RandomData(size["shapes"], size["batch"], steps))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "gpu" else None
    return {"step_ms": 1e3 * statistics.median(timer.times), "peak_mib": peak}


def raw_loop(size, steps: int, warmup: int, device: str) -> float:
    """InterOnly trained by hand: forward, CE, backward, SGD step. Median ms per step."""
    model = build(InterOnly, {}, size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = RandomData(size["shapes"], size["batch"], steps).batches
    times = []
    for i, b in enumerate(data):
        inputs = {m: x.to(device) for m, x in b.inputs.items()}
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model.joint(inputs), b.target.to(device))
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def weight_times(size, repeats: int = 50) -> dict:
    """Per-step weight computation on one real gradient matrix of the reference model."""
    model = build(MultiObjective, {"rule": Sum()}, size)
    data = RandomData(size["shapes"], size["batch"], 1).batches[0]
    losses = model.objectives(model(data.inputs), data.target)
    rows = jac.objective_rows(losses, model.groups)
    encoders = [g for g in model.groups if g.name.startswith("encoder.")]
    # MGDA over ALL objectives on the shared parameters (the encoders): [M+1, P_shared]
    shared = torch.cat(
        [
            torch.cat(
                [
                    rows[g.name][g.objectives.index(k)]
                    if k in g.objectives
                    else torch.zeros(g.numel)
                    for g in encoders
                ]
            ).unsqueeze(0)
            for k in ["fused", *model.modalities]
        ]
    )
    uni = torch.stack([losses[m].detach() for m in model.modalities])
    bogc = BOGCCalibration()

    def clock(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e6 * (time.perf_counter() - t0) / repeats

    return {
        "matrix": list(shared.shape),
        "mimo_softmax_us": clock(lambda: torch.softmax(uni / 0.5, 0)),
        "mgda_min_norm_us": clock(lambda: MGDA().combine(shared)),
        "bogc_calibration_us": clock(
            lambda: [bogc.combine(rows[g.name], g.name) for g in encoders]
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="cpu", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    size = SIZES[args.size]
    device = "gpu" if args.size == "gpu" else "cpu"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {
        n: time_strategy(c, kw, size, args.steps, args.warmup, device)
        for n, (c, kw) in STRATEGIES.items()
    }
    ref = results["InterOnly+heads (ref)"]["step_ms"]
    raw = raw_loop(size, args.steps, args.warmup, device)
    weights = weight_times(size)
    print(
        f"\nstep cost, size={args.size}, batch {size['batch']}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, median of {args.steps - args.warmup} steps\n"
    )
    print("| strategy | step (ms) | x ref |")
    print("|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['step_ms']:.1f} | {r['step_ms'] / ref:.2f} |")
    inter = results["InterOnly"]["step_ms"]
    print(f"| raw PyTorch loop (InterOnly) | {raw:.1f} | framework/raw = {inter / raw:.2f} |")
    print(f"\nweight computation on the gradient matrix {weights['matrix']}:")
    print(
        f"  MIMO softmax {weights['mimo_softmax_us']:.1f} us, MGDA min-norm "
        f"{weights['mgda_min_norm_us']:.1f} us "
        f"({weights['mgda_min_norm_us'] / weights['mimo_softmax_us']:.0f}x MIMO), BOGC "
        f"calibration {weights['bogc_calibration_us']:.1f} us"
    )
    out = Path(__file__).parent / "results" / f"step_cost_{args.size}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "size": args.size,
                "batch": size["batch"],
                "steps": args.steps,
                "strategies": results,
                "raw_loop_ms": raw,
                "weights": weights,
            },
            indent=2,
        )
    )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
