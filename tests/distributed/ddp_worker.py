"""Train strategies for a few steps and save every rank's parameters (run by test_ddp.py).

``python ddp_worker.py OUT STRATEGY... --batch B`` trains each in one process; under
``torch.distributed.run --nproc_per_node 2`` each rank trains on its half of every global batch.
Rank r of W takes samples ``[i*W*B + r*B, i*W*B + (r+1)*B)`` of global batch i, so the union of
the ranks' batches at a step is exactly the single-process batch of size W*B at that step.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from mmlearn.batch import collate_multimodal
from mmlearn.data import SyntheticMultimodal
from mmlearn.data.base import SplitDataset
from mmlearn.gradients import MGDA, Sum
from mmlearn.strategies import STRATEGIES

warnings.filterwarnings("ignore")


class ShardedBatches(Sampler[list[int]]):
    """Consecutive global batches of ``world * batch``; this rank's contiguous share of each."""

    def __init__(self, n: int, batch: int, rank: int, world: int) -> None:
        self.n, self.batch, self.rank, self.world = n, batch, rank, world

    def __iter__(self):
        step = self.batch * self.world
        for start in range(0, self.n - step + 1, step):
            lo = start + self.rank * self.batch
            yield list(range(lo, lo + self.batch))

    def __len__(self) -> int:
        return self.n // (self.batch * self.world)


class ShardedSynthetic(SyntheticMultimodal):
    def __init__(self, batch: int, rank: int, world: int, **kw) -> None:
        super().__init__(**kw)
        self.b, self.rank, self.world = batch, rank, world

    def train_dataloader(self) -> DataLoader:
        ds = SplitDataset(self.splits["train"])
        sampler = ShardedBatches(len(ds), self.b, self.rank, self.world)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_multimodal)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("strategies", nargs="+")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--local-statistics", action="store_true")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    data = ShardedSynthetic(
        args.batch,
        rank,
        world,
        num_modalities=3,
        dim=[6, 5, 4],
        num_classes=3,
        intra=[1.0, 0.5, 0.2],
        inter=1.0,
        noise=[0.3, 1.0, 2.0],
        n_train=256,
        n_val=8,
        n_test=8,
    )
    for strategy in args.strategies:
        out = Path(args.out) / strategy
        out.mkdir(parents=True, exist_ok=True)
        init, state = train(strategy, data, world, args.steps, args.local_statistics)
        torch.save(init, out / "init.pt")
        torch.save(state, out / f"rank{rank}.pt")


def train(strategy: str, data, world: int, steps: int, local_statistics: bool):
    """``(initial, final)`` state dicts of ``steps`` steps of ``strategy``."""
    torch.manual_seed(0)
    name, kw = strategy, {}
    if name == "MGDA":
        name, kw = "MultiObjective", {"rule": MGDA()}
    if name == "Sum":
        name, kw = "MultiObjective", {"rule": Sum()}
    if name == "BOGC-microbatch":
        name, kw = "BOGC", {"variance": "microbatch", "n_chunks": 4}
    if name == "BOGC-last_layer":
        name, kw = "BOGC", {"variance": "last_layer"}
    if local_statistics:
        kw["local_statistics"] = True
    model = STRATEGIES[name](
        input_shapes=data.input_shapes,
        num_classes=3,
        embed_dim=8,
        head_hidden=16,
        **kw,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
    )
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_steps=steps,
        use_distributed_sampler=False,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, datamodule=data)
    return init, {k: v.detach().cpu() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
