"""``mmlearn compare``: fit and test several strategy configs over seeds, then tabulate.

Each (config, seed) is one ``mmlearn fit`` run in this process with ``seed_everything`` and the
DataModule's ``seed`` (split and shuffling order) both set to the seed, so strategies compared at
the same seed see the same split and the same batches. After fitting, the best checkpoint (by
``val/acc``) is tested. Every run keeps its own directory (config, checkpoints, metrics).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = ("test/acc", "test/f1")


def run_one(config: str, seed: int, out: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Fit ``config`` with ``seed``, test its best checkpoint, return the row of the table."""
    from mmlearn.cli import build_cli

    name = Path(config).stem
    args = [
        "fit",
        "--config",
        config,
        *extra,  # before the seeds: replacing `data` must not reset the data seed
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    start = time.perf_counter()
    cli = build_cli(args)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    results = cli.trainer.test(
        cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False
    )
    test_s = time.perf_counter() - start
    row: dict[str, Any] = {"strategy": name, "seed": seed}
    row |= {k: float(v) for k, v in results[0].items() if k.startswith("test/")}
    row |= {"fit_s": fit_s, "test_s": test_s, "run_dir": cli.trainer.log_dir}
    return row


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy: mean and sample std (0 for one seed) of the test metrics and fit time."""
    out = []
    for name in dict.fromkeys(r["strategy"] for r in rows):
        group = [r for r in rows if r["strategy"] == name]
        entry: dict[str, Any] = {"strategy": name, "seeds": len(group)}
        for key in (*METRICS, "fit_s"):
            values = [r[key] for r in group if key in r]
            entry[key] = statistics.fmean(values) if values else math.nan
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (mean +- std over seeds)."""
    lines = [
        "| strategy | seeds | test acc | test macro-F1 | fit time (s) |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        cells = [f"{s[k]:.4f} ± {s[k + '_std']:.4f}" for k in METRICS]
        fit = f"{s['fit_s']:.1f} ± {s['fit_s_std']:.1f}"
        lines.append(f"| {s['strategy']} | {s['seeds']} | {cells[0]} | {cells[1]} | {fit} |")
    return "\n".join(lines)


def compare_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmlearn compare", description=__doc__)
    parser.add_argument("configs", nargs="+", help="experiment configs, one per strategy")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="runs/compare", help="where runs and tables go")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra CLI override for every run, e.g. --set trainer.max_epochs=5",
    )
    args = parser.parse_args(list(argv))
    # one table is the output; Lightning's per-run banners would bury it
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for config in args.configs:
        if not Path(config).is_file():
            parser.error(f"config {config!r} does not exist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [f"--{kv}" for kv in args.set]
    rows = [run_one(c, s, out, extra) for s in args.seeds for c in args.configs]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(summarise(rows))
    (out / "summary.md").write_text(table + "\n")
    print("\n" + table + f"\n\nper-run results: {out / 'results.csv'}")
    return 0
