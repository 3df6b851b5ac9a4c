"""``mmlearn evaluate``'s cost on mfeat: 6 modalities, 63 subsets x 4 semantics, probes.

``python benchmarks/evaluate_time.py [--rounds R] [--epochs E]`` (part of ``make bench``; needs
``make data``) trains InterOnly and I2M2 on mfeat for E epochs, then times
:func:`mmlearn.evaluation.evaluate.evaluate` on each, R rounds interleaved, with and without the
probes (the command's start, ~4 s of imports, is not included). Prints the median and the min-max
of each and writes ``benchmarks/results/evaluate_cpu.json``. Target: <= 30 s with probes on 2
CPU cores. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from mmlearn.data import MultipleFeatures
from mmlearn.evaluation.evaluate import evaluate
from mmlearn.strategies import I2M2, InterOnly


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    dm = MultipleFeatures(seed=0)
    dm.setup("fit")
    models = {}
    for cls in (InterOnly, I2M2):
        torch.manual_seed(0)
        model = cls(input_shapes=dm.input_shapes, num_classes=dm.num_classes, embed_dim=64)
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=dm)
        models[cls.__name__] = model
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            for probes in (True, False):
                start = time.perf_counter()
                result = evaluate(model, dm, probes=probes)
                key = f"{name} {'with' if probes else 'without'} probes"
                times.setdefault(key, []).append(time.perf_counter() - start)
    assert len(result.rows) == 4 * 63
    print(
        f"evaluate on mfeat ({result.n_test} test samples, 63 subsets x 4 semantics), "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds:"
    )
    report = {}
    for key, values in times.items():
        med = statistics.median(values)
        report[key] = {"median_s": med, "min_s": min(values), "max_s": max(values)}
        print(f"  {key:28s} {med:6.2f} s  [{min(values):.2f}-{max(values):.2f}]")
    out = Path(__file__).parent / "results" / "evaluate_cpu.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
