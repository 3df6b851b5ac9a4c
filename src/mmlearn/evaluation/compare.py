"""``mmlearn compare``: fit and test strategies over seeds (or collect finished runs), then report.

Each (config, seed) is one ``mmlearn fit`` with ``seed_everything`` = the seed; the DataModule's
split and shuffling follow it, so strategies compared at one seed see the same split and the same
batches. The best checkpoint (by ``val/acc``) is tested. Runs go one after another in this
process, or ``--jobs N`` at a time, each in a fresh process. ``--collect DIR ...`` skips training
and reads runs that already exist (from a sweep, a Slurm array, an earlier compare).

Writes to ``--out``: ``results.csv`` (one row per run), ``summary.csv`` and ``summary.md`` (mean,
std, 95% CI per metric; paired tests against ``--baseline``), ``comparison.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from mmlearn.errors import MMLearnError
from mmlearn.evaluation.report import Row, markdown_table, plot, summarise, write_csv
from mmlearn.lightning_cli import build_cli

METRICS = ("test/acc", "test/f1")
WANDB_DEFAULTS = {"project": "mmlearn"}


def _loggers(out: Path, name: str, wandb: bool) -> str:
    """The ``--trainer.logger`` value of one run: the CSV run folder, plus W&B when asked."""
    loggers: list[dict[str, Any]] = [
        {
            "class_path": "mmlearn.loggers.CSVLogger",
            "init_args": {"save_dir": str(out), "name": name},
        }
    ]
    if wandb:
        init = {"save_dir": str(out), **WANDB_DEFAULTS}
        loggers.append({"class_path": "mmlearn.loggers.WandbLogger", "init_args": init})
    return json.dumps(loggers)


def run_one(
    config: str, seed: int, out: Path, extra: Sequence[str] = (), wandb: bool = False
) -> Row:
    """Fit ``config`` with ``seed``, test its best checkpoint, return the row of the table."""
    from lightning.pytorch.loggers import WandbLogger

    name = Path(config).stem
    args = [
        "fit",
        "--config",
        config,
        *extra,  # before the seeds: replacing `data` must not reset the data seed
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.logger={_loggers(out, name, wandb)}",
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
    for logger in cli.trainer.loggers:  # the next run must start its own W&B run
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
    row: Row = {"strategy": name, "seed": seed}
    row |= {k: float(v) for k, v in results[0].items() if k.startswith("test/")}
    row |= {"fit_s": fit_s, "test_s": test_s, "run_dir": cli.trainer.log_dir}
    return row


def _run_in_fresh_process(
    config: str, seed: int, out: Path, extra: Sequence[str], wandb: bool, threads: int
) -> Row:
    import torch

    torch.set_num_threads(threads)  # N processes share the cores instead of oversubscribing
    _quiet()
    return run_one(config, seed, out, extra, wandb)


def _label(cfg: dict[str, Any]) -> str:
    """Strategy label of a saved run config: its CSV run name, else its strategy class."""
    loggers = cfg.get("trainer", {}).get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        name = (logger or {}).get("init_args", {}).get("name") if isinstance(logger, dict) else None
        if str((logger or {}).get("class_path", "")).endswith("CSVLogger") and name:
            return str(name).rsplit("/", 1)[-1]
    model = cfg["model"]
    label = str(model["class_path"]).rsplit(".", 1)[-1]
    rule = (model.get("init_args") or {}).get("rule")
    if isinstance(rule, dict):
        label += "-" + str(rule["class_path"]).rsplit(".", 1)[-1]
    return label


def collect(folders: Sequence[str]) -> tuple[list[Row], list[str]]:
    """Rows of every finished run under ``folders`` (a ``config.yaml`` beside a ``metrics.csv``).

    Returns:
        (rows, skipped): ``skipped`` names runs that hold no test metrics yet.
    """
    rows: list[Row] = []
    skipped: list[str] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise MMLearnError(f"--collect {folder!r}: no such folder")
        for config in sorted(Path(folder).rglob("config.yaml")):
            metrics_file = config.parent / "metrics.csv"
            if not metrics_file.is_file():
                continue
            cfg = yaml.safe_load(config.read_text()) or {}
            with open(metrics_file, newline="") as f:
                tested = [r for r in csv.DictReader(f) if r.get("test/acc")]
            if not tested:
                skipped.append(str(config.parent))
                continue
            row: Row = {"strategy": _label(cfg), "seed": cfg.get("seed_everything")}
            row |= {k: float(v) for k, v in tested[-1].items() if k.startswith("test/") and v}
            rows.append(row | {"run_dir": str(config.parent)})
    if not rows:
        raise MMLearnError(
            f"--collect {list(folders)}: found no run with test metrics (a config.yaml beside a "
            "metrics.csv holding test/acc); fit with --test_after_fit=true or run `mmlearn test`"
        )
    return rows, skipped


def _quiet() -> None:
    # one table is the output; Lightning's per-run banners would bury it
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _log_to_wandb(out: Path, summary: Sequence[Row], table: str) -> None:
    """The comparison as its own W&B run (job type ``compare``): the summary table and the plot."""
    import wandb

    from mmlearn.loggers import wandb_credentials

    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", WANDB_DEFAULTS["project"]),
        job_type="compare",
        name=f"compare-{out.name}",
        dir=str(out),
        mode=mode,  # type: ignore[arg-type]
    )
    columns = list(dict.fromkeys(k for e in summary for k in e))
    run.log(
        {
            "compare/summary": wandb.Table(
                columns=list[str | int](columns),
                data=[[e.get(c) for c in columns] for e in summary],
            ),
            "compare/plot": wandb.Image(str(out / "comparison.png")),
        }
    )
    run.summary["compare/markdown"] = table
    run.finish()


def compare_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mmlearn compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("configs", nargs="*", help="experiment configs, one per strategy")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="runs/compare", help="where runs and reports go")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra CLI option for every run, e.g. --set trainer.max_epochs=5",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process (default 1: in this one)",
    )
    parser.add_argument(
        "--collect",
        nargs="+",
        metavar="DIR",
        help="report on finished runs under these folders instead of training",
    )
    parser.add_argument(
        "--baseline",
        help="strategy the others are tested against (default: "
        "the first config / the first strategy found)",
    )
    parser.add_argument("--metrics", nargs="+", default=list(METRICS))
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="log every run and the comparison to W&B (offline without an account)",
    )
    args = parser.parse_args(list(argv))
    _quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.collect:
        if args.configs:
            parser.error("give configs to run, or --collect folders, not both")
        rows, skipped = collect(args.collect)
        for run in skipped:
            print(f"skipped (no test metrics): {run}")
    else:
        if not args.configs:
            parser.error("give at least one experiment config (or --collect DIR)")
        for config in args.configs:
            if not Path(config).is_file():
                parser.error(f"config {config!r} does not exist")
        if args.jobs < 1:
            parser.error(f"--jobs {args.jobs}: expected >= 1")
        extra = [f"--{kv}" for kv in args.set]
        todo = [(c, s) for s in args.seeds for c in args.configs]
        if args.jobs == 1:
            rows = [run_one(c, s, out, extra, args.wandb) for c, s in todo]
        else:
            threads = max(1, (os.cpu_count() or 1) // args.jobs)
            ctx = multiprocessing.get_context("spawn")  # no forked torch/W&B state
            pool = (
                ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1)
                if sys.version_info >= (3, 11)
                else ProcessPoolExecutor(args.jobs, mp_context=ctx)
            )
            with pool:
                futures = [
                    pool.submit(_run_in_fresh_process, c, s, out, extra, args.wandb, threads)
                    for c, s in todo
                ]
                rows = [f.result() for f in futures]
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    baseline = args.baseline or strategies[0]
    if baseline not in strategies:
        parser.error(f"--baseline {baseline!r} is not among the strategies {strategies}")
    summary = summarise(rows, args.metrics, baseline)
    write_csv(out / "results.csv", rows)
    write_csv(out / "summary.csv", summary)
    table = markdown_table(summary, baseline)
    (out / "summary.md").write_text(table + "\n")
    plot(rows, summary, out / "comparison.png")
    if args.wandb:
        _log_to_wandb(out, summary, table)
    print("\n" + table + f"\n\nper run: {out / 'results.csv'}   plot: {out / 'comparison.png'}")
    return 0
