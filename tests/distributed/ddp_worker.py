"""Train strategies for a few steps and save every rank's parameters (run by test_ddp.py).

``python ddp_worker.py OUT CASE... --batch B`` trains each case in one process; under
``torch.distributed.run --nproc_per_node 2`` each rank trains on its half of every global batch.
Rank r of W takes samples ``[i*W*B + r*B, i*W*B + (r+1)*B)`` of global batch i, so the union of
the ranks' batches at a step is exactly the single-process batch of size W*B at that step.

A case is a strategy with its options (:data:`CASES`: every strategy of ``tests/helpers.py``,
i.e. each registered one with its defaults and the variants the CLI tests run, then the variants
of every rule scope, moments estimator and ``every``), on vector data or, for
:data:`BN_CASES`, with a BatchNorm encoder on an image modality. :data:`WRONG` are deliberately
wrong variants (a rule on rank-local statistics) that the test must tell apart from single-process
training. A case that raises writes ``OUT/CASE/error-rank{r}.txt`` and the worker goes on.
:data:`TORCHJD_CASES` need the optional torchjd.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from mmlearn.batch import collate_multimodal
from mmlearn.data import SyntheticMultimodal
from mmlearn.data.base import Split, SplitDataset
from mmlearn.strategies import MIMO, STRATEGIES
from mmlearn.strategies.step import ManualStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers (as a script)
from helpers import STRATEGY_OPTIONS, VARIANTS, Options, instantiate, spec  # noqa: E402

warnings.filterwarnings("ignore")


class RankLocalStep(ManualStep):
    """WRONG on purpose: the rule applied to each rank's own statistics, the results averaged.

    ``sync`` skips the all-reduce, so the moments estimator and the rule see this rank's rows
    only; ``finalize`` all-reduces the combined rows so the replicas stay identical (the mistake
    is invisible from the parameters of one run). ``finish`` divides the un-summed rows by the
    world size, and every rule is positively homogeneous (BOGC's evidence is scale-free), so the
    SUM over ranks written here is the MEAN over ranks of the rule applied to each rank's rows.
    For the linear ``Sum`` rule that mean is the right gradient: the control case.
    """

    def sync(self, stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(stats)

    def finalize(self, combined: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, row in combined.items():
            row = row.clone()
            dist.all_reduce(row)
            out[name] = row
        return out


class RankLocalMIMO(MIMO):
    """WRONG on purpose: ``pi`` from this rank's unimodal losses (no ``sync_mean``)."""

    def modality_weights(self, losses: Mapping[str, Tensor]) -> Tensor:
        uni = torch.stack([losses[m].detach().float() for m in self.modalities])
        return torch.softmax(uni / self.mu, dim=0)


MGDA_OPTIONS = VARIANTS["MGDA"][1]  # MultiObjective with MGDA (scope="global")
MICROBATCH = "mmlearn.strategies.Microbatch"
TORCHJD = "mmlearn.gradients.TorchJD"
UPGRAD, PCGRAD = "torchjd.aggregation.UPGrad", "torchjd.aggregation.PCGrad"
#: id -> (registered strategy, options as a config writes them): every strategy of the tests
#: (each registered one with its defaults, BOGC: EMAMoments, MultiObjective: Sum with BatchRows;
#: then MGDA), then the variants of every rule scope, moments estimator and ``every``
CASES: dict[str, tuple[str, Options]] = STRATEGY_OPTIONS | {
    "MGDA-per_group": (
        "MultiObjective",
        {"rule": spec("mmlearn.gradients.MGDA", scope="per_group")},
    ),
    "MGDA-every2": ("MultiObjective", {**MGDA_OPTIONS, "every": 2}),
    "MGDA-microbatch2": (
        "MultiObjective",
        {**MGDA_OPTIONS, "moments": spec(MICROBATCH, n_chunks=2)},
    ),
    "Sum-ema": ("MultiObjective", {"moments": spec("mmlearn.strategies.EMAMoments", beta=0.5)}),
    "BOGC-microbatch4": ("BOGC", {"moments": spec(MICROBATCH, n_chunks=4)}),
    "BOGC-microbatch2": ("BOGC", {"moments": spec(MICROBATCH, n_chunks=2)}),  # 1 chunk a rank
    "BOGC-last_layer": ("BOGC", {"moments": spec("mmlearn.strategies.LastLayer")}),
    "BOGC-every2": ("BOGC", {"every": 2}),
    # torchjd's aggregators through the TorchJD rule (scope global: one Jacobian over all 4
    # objectives); PCGrad's random order of projections comes from the rule's own seeded stream
    "TorchJD-UPGrad": ("MultiObjective", {"rule": spec(TORCHJD, aggregator=spec(UPGRAD))}),
    "TorchJD-PCGrad": ("MultiObjective", {"rule": spec(TORCHJD, aggregator=spec(PCGRAD))}),
}
#: the cases that need torchjd (test_ddp.py skips them without it, fails under CI)
TORCHJD_CASES = [case for case in CASES if case.startswith("TorchJD-")]
#: cases with a BatchNorm encoder (a tiny resnet18) on an image-shaped modality. A sample on
#: purpose, not every case: the BatchNorm synchronisation is the base module's, the same for every
#: strategy, and these cover automatic optimisation with one objective (InterOnly) and with
#: unimodal heads (LateFusionHeads), and the manual step with a rule (MGDA) and with EMA moments
#: (BOGC); Microbatch refuses BatchNorm. The test checks both optimisation modes are covered.
BN_CASES: dict[str, str] = {
    "InterOnly-bn": "InterOnly",
    "LateFusionHeads-bn": "LateFusionHeads",
    "MGDA-bn": "MGDA",
    "BOGC-bn": "BOGC",
}
RESNET = {"name": "resnet18", "width": 4, "blocks": [1, 1]}
#: wrong variant -> the case whose single-process result it must NOT reproduce (Sum: a control
#: that must reproduce it, as the rank-local mean of a linear rule is the right gradient). One
#: per place where statistics are reduced over the ranks: the manual step's rows (RankLocalStep:
#: two non-linear rules, and the control) and MIMO's modality weights (RankLocalMIMO)
WRONG: dict[str, str] = {
    "MGDA-local": "MGDA",
    "BOGC-local": "BOGC",
    "MIMO-local": "MIMO",
    "Sum-local": "MultiObjective",
    "TorchJD-UPGrad-local": "TorchJD-UPGrad",
}


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
    def __init__(self, batch: int, rank: int, world: int, image: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.b, self.rank, self.world, self.image = batch, rank, world, image

    def load_splits(self) -> dict[str, Split]:
        splits = super().load_splits()
        if not self.image:
            return splits
        # m0 (64 features) as a one-channel 8x8 image, for a convolutional encoder with BatchNorm
        return {
            s: Split(sp.inputs | {"m0": sp.inputs["m0"].view(-1, 1, 8, 8)}, sp.target)
            for s, sp in splits.items()
        }

    def train_dataloader(self) -> DataLoader:
        ds = SplitDataset(self.splits["train"])
        sampler = ShardedBatches(len(ds), self.b, self.rank, self.world)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_multimodal)


def build(case: str, data: ShardedSynthetic) -> pl.LightningModule:
    """The model of ``case``, seeded so that every process starts from the same weights."""
    torch.manual_seed(0)
    encoders = None
    if case in BN_CASES:
        case, encoders = BN_CASES[case], {"m0": RESNET}
    wrong = case in WRONG
    if wrong:
        case = WRONG[case]
    name, options = CASES[case]
    cls = RankLocalMIMO if wrong and name == "MIMO" else STRATEGIES[name]
    model = cls(
        input_shapes=data.input_shapes,
        num_classes=3,
        embed_dim=8,
        head_hidden=None if cls.linear_fused_head else 16,
        encoders=encoders,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
        **instantiate(options),
    )
    if wrong and name != "MIMO":
        model.gradient_step = RankLocalStep()
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("cases", nargs="+")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    common = {"num_classes": 3, "inter": 1.0, "n_train": 256, "n_val": 8, "n_test": 8}
    vectors = ShardedSynthetic(
        args.batch,
        rank,
        world,
        num_modalities=3,
        dim=[6, 5, 4],
        intra=[1.0, 0.5, 0.2],
        noise=[0.3, 1.0, 2.0],
        **common,
    )
    images = ShardedSynthetic(
        args.batch,
        rank,
        world,
        image=True,
        num_modalities=2,
        dim=[64, 5],
        intra=[1.0, 0.5],
        **common,
    )
    for case in args.cases:
        out = Path(args.out) / case
        out.mkdir(parents=True, exist_ok=True)
        data = images if case in BN_CASES else vectors
        try:
            init, state = train(build(case, data), data, world, args.steps)
        except Exception:
            (out / f"error-rank{rank}.txt").write_text(traceback.format_exc())
            continue
        torch.save(init, out / "init.pt")
        torch.save(state, out / f"rank{rank}.pt")


def train(model: pl.LightningModule, data, world: int, steps: int):
    """``(initial, final)`` state dicts of ``steps`` steps of ``model``."""
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
