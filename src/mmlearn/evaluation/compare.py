"""``mmlearn compare``: fit and test strategies over seeds (or collect finished runs), then report.

Each (config, seed) is one ``mmlearn fit`` with ``seed_everything`` = the seed; the DataModule's
split and shuffling follow it, so strategies compared at one seed see the same split and the same
batches. The best checkpoint (by ``val/acc``) is tested. Runs go one after another in this
process, or ``--jobs N`` at a time, each in a fresh process. ``--collect DIR ...`` skips training
and reads runs that already exist (from a sweep, a Slurm array, an earlier compare).

Everything is checked before the first run: every config (exists, is YAML, names a known strategy
and DataModule, parses as the run will parse it, ``--set`` options included), ``--baseline``,
``--metrics`` and ``--out`` (a writable folder without the reports of an earlier compare, unless
``--overwrite``). Each finished run prints one line ``[k/N]`` and is added to ``results.csv`` at
once. A run that fails is named (config, seed, error) and the others go on; the exit status is
then 1. Stopping the compare (SIGTERM, Ctrl-C) stops its ``--jobs`` workers.

Writes to ``--out``: ``results.csv`` (one row per run), ``summary.csv`` and ``summary.md`` (mean,
std, 95% CI per metric; paired tests against ``--baseline``; the training protocol every strategy
got, also as ``protocol.md``), ``comparison.png``; when runs fail,
``failures.csv`` (config, seed, error) and ``failures.log`` (their tracebacks).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmlearn.errors import MMLearnError, user_error
from mmlearn.evaluation import compare_eval
from mmlearn.evaluation.compare_eval import EVAL_REPORTS
from mmlearn.evaluation.protocol import protocol
from mmlearn.evaluation.report import Row, markdown_table, plot, summarise, write_csv
from mmlearn.lightning_cli import build_cli

METRICS = ("test/acc", "test/f1")
WANDB_DEFAULTS = {"project": "mmlearn"}
#: the files a compare writes into ``--out`` beside the run folders. A folder holding any of them
#: is refused (another compare's results would read as this one's); ``--overwrite`` deletes them
#: before the first run.
REPORTS = (
    "results.csv",
    "summary.csv",
    "summary.md",
    "comparison.png",
    "failures.csv",
    "failures.log",
    *EVAL_REPORTS,
)
#: seconds a stopped worker has to exit after SIGTERM before it is killed (its fit saves
#: ``last.ckpt`` at the end of the current batch, then exits)
STOP_GRACE_S = 10.0
#: the longest error message of a console line (failures.log holds the whole traceback)
MESSAGE_CHARS = 400
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Task:
    """One (config, seed) of a compare; ``index`` is its row in ``results.csv``."""

    index: int
    config: str
    seed: int
    #: ``--train_fractions``: the DataModule's ``train_fraction`` of this run (None: not set)
    fraction: float | None = None

    def extra(self, settings: Settings) -> tuple[str, ...]:
        """The ``--set`` options, and this run's training fraction."""
        if self.fraction is None:
            return settings.extra
        return (*settings.extra, f"--data.init_args.train_fraction={self.fraction}")

    @property
    def strategy(self) -> str:
        return strategy_label(self.config)


@dataclass(frozen=True)
class Settings:
    """What every run of one compare shares: the output folder, ``--set`` options, W&B."""

    out: Path
    extra: tuple[str, ...] = ()
    wandb: bool = False
    #: ``--evaluate``: evaluate every run's best checkpoint (mmlearn.evaluation.evaluate)
    evaluate: bool = False


@dataclass
class Outcome:
    """A finished task: its row, or the one-line error (and the traceback) it failed with."""

    task: Task
    wall_s: float
    row: Row | None = None
    error: str = ""
    detail: str = ""


class Stopped(BaseException):
    """SIGTERM or SIGINT reached the compare (not an ``Exception``: no run takes it as its own)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def strategy_label(config: str) -> str:
    """A compared strategy's label: its config's file name (``i2m2`` for ``.../i2m2.yaml``)."""
    return Path(config).stem


def _shorten(text: str) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _explain(exc: BaseException, args: Sequence[str]) -> str | None:
    """The ``mmlearn`` command's one-line message for a user error (``mmlearn.cli.explain``).

    Looked up, not imported by name: ``mmlearn.cli`` imports this module, and without that
    function the message is this module's own.
    """
    from mmlearn import cli

    explain = getattr(cli, "explain", None)
    if not callable(explain) or not isinstance(exc, Exception):
        return None
    try:
        message = explain(exc, list(args))
    except Exception:
        return None
    return message if isinstance(message, str) and message else None


def one_line(exc: BaseException, args: Sequence[str] = ()) -> str:
    """The error of a failed run on one line: as the ``mmlearn`` command prints a user error,
    else ``Type: message``. ``args``: the run's command line (names the configs in it)."""
    if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
        return f"{type(exc).__name__}: exit status {exc.code} (the lines above say why)"
    message = _explain(exc, args)
    if message is not None:
        return _shorten(message)
    err = user_error(exc)
    if isinstance(err, MMLearnError):
        return _shorten(str(err))
    err = err or exc
    return _shorten(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


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


def _fit_args(config: str, seed: int, out: Path, extra: Sequence[str], wandb: bool) -> list[str]:
    """The ``mmlearn fit`` arguments of one run."""
    return [
        "fit",
        "--config",
        config,
        *extra,  # before the seeds: replacing `data` must not reset the data seed
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.logger={_loggers(out, strategy_label(config), wandb)}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def run_one(
    config: str,
    seed: int,
    out: Path,
    extra: Sequence[str] = (),
    wandb: bool = False,
    evaluate: bool = False,
) -> Row:
    """Fit ``config`` with ``seed``, test its best checkpoint, return the row of the table.

    With ``evaluate``, the best checkpoint is also evaluated (``mmlearn evaluate``'s files in
    ``RUN/evaluate/<checkpoint>/``; the row's ``evaluation`` names its ``evaluation.json``).
    """
    from lightning.pytorch.loggers import WandbLogger

    start = time.perf_counter()
    cli = build_cli(_fit_args(config, seed, out, extra, wandb))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    results = cli.trainer.test(
        cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False
    )
    test_s = time.perf_counter() - start
    evaluation = _evaluate_best(cli) if evaluate else None
    for logger in cli.trainer.loggers:  # the next run must start its own W&B run
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
    row: Row = {"strategy": strategy_label(config), "seed": seed}
    row |= {k: float(v) for k, v in results[0].items() if k.startswith("test/")}
    row |= {"fit_s": fit_s, "test_s": test_s, "run_dir": cli.trainer.log_dir}
    fraction = getattr(cli.datamodule, "train_fraction", 1.0)
    if fraction != 1.0:
        row["train_fraction"] = fraction
    if evaluation is not None:
        row["evaluation"] = str(evaluation)
    return row


def _evaluate_best(cli: Any) -> Path:
    """Evaluate the tested (best) weights of ``cli.model``; the path of its evaluation.json."""
    import torch

    from mmlearn.data.base import stored_input_means
    from mmlearn.evaluation import eval_files
    from mmlearn.evaluation.command import default_out, log_to_wandb
    from mmlearn.evaluation.evaluate import evaluate
    from mmlearn.lightning_cli import read_checkpoint

    best = cli.trainer.checkpoint_callback.best_model_path
    checkpoint = read_checkpoint(best)
    means = stored_input_means(checkpoint)
    with torch.no_grad():
        result = evaluate(
            cli.model,
            cli.datamodule,
            device=cli.trainer.strategy.root_device,
            input_means=means,
            means_source="stored with the run (its checkpoint)" if means is not None else None,
        )
    folder = default_out(best)
    extra = {"checkpoint": best, "data": type(cli.datamodule).__name__}
    eval_files.write(result, folder, extra)
    log_to_wandb(cli.trainer.loggers, result, folder)
    return folder / "evaluation.json"


def _finish_wandb() -> None:
    """Close the W&B run a failed run left open: the next run in this process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):
            wandb.run.finish(exit_code=1)


def _stop_signal(exc: SystemExit) -> int | None:
    """The signal behind a run's exit, when a stop signal ended its fit, else ``None``.

    During a fit SIGTERM and SIGINT are the run's own: the checkpoint callback saves ``last.ckpt``
    at the end of the batch and exits with 128 + the signal (Lightning alone raises
    ``SIGTERMException``). Such an exit stops the compare; it is not the run's failure.
    """
    if isinstance(exc, SIGTERMException):
        return int(signal.SIGTERM)
    stops = {128 + int(s): int(s) for s in (signal.SIGTERM, signal.SIGINT)}
    return stops.get(exc.code) if isinstance(exc.code, int) else None


def attempt(task: Task, settings: Settings) -> Outcome:
    """Run ``task``; its failure (any error, or the CLI exiting) is its outcome, not raised.

    Raises:
        Stopped: SIGTERM or SIGINT stopped the run.
    """
    start = time.perf_counter()
    try:
        row = run_one(
            task.config,
            task.seed,
            settings.out,
            task.extra(settings),
            settings.wandb,
            settings.evaluate,
        )
    except (Exception, SystemExit) as exc:
        stop = _stop_signal(exc) if isinstance(exc, SystemExit) else None
        if stop is not None:
            raise Stopped(stop) from exc
        if settings.wandb:
            _finish_wandb()
        took = time.perf_counter() - start
        args = _fit_args(task.config, task.seed, settings.out, task.extra(settings), settings.wandb)
        error = one_line(exc, args)
        return Outcome(task, took, error=error, detail=traceback.format_exc())
    return Outcome(task, time.perf_counter() - start, row=row)


# ---- checks before the first run -----------------------------------------------------------


def _parse_problem(args: Sequence[str]) -> str | None:
    """Why the LightningCLI refuses ``args``, or ``None``; instantiates nothing, runs nothing.

    ``--print_config`` makes the CLI parse and validate everything a run would (the config, the
    ``--set`` options, every class's arguments) and exit; its printout is discarded.
    """
    printed, errors = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
            build_cli([*args, "--print_config"])
    except SystemExit as exc:  # the CLI printed the config (0) or its error (2)
        if exc.code in (0, None):
            return None
        text = errors.getvalue()
        if "error:" in text:
            text = text[text.index("error:") + len("error:") :]
        return _shorten(text) or f"the CLI exited with status {exc.code}"
    except Exception as exc:
        return one_line(exc, args)
    return None


def check_configs(configs: Sequence[str], seed: int, settings: Settings) -> None:
    """Raise :class:`MMLearnError` for the first config a run would refuse, before any runs.

    Each config must exist, be a YAML mapping, name a known strategy and DataModule
    (:func:`mmlearn.cli.check_choices`) and parse as its run will parse it, with the ``--set``
    options; the labels (file names) must differ, or their runs would be pooled.
    """
    from mmlearn.cli import check_choices  # mmlearn.cli imports this module

    labels = [strategy_label(c) for c in configs]
    for label in dict.fromkeys(labels):
        same = [c for c in configs if strategy_label(c) == label]
        if len(same) > 1:
            raise MMLearnError(
                f"configs {same} share the label {label!r} (a strategy's label is its file "
                "name): rename one, or compare them in separate --out folders"
            )
    for config in configs:
        path = Path(config)
        if not path.is_file():
            raise MMLearnError(f"config {config!r} does not exist")
        try:
            content = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            message = f"config {config!r} is not readable YAML: {_shorten(str(exc))}"
            raise MMLearnError(message) from exc
        if not isinstance(content, dict):
            raise MMLearnError(
                f"config {config!r}: expected a mapping (model:, data:, trainer: ...), "
                f"got {type(content).__name__}"
            )
        check_choices(["--config", config, *settings.extra])
        args = _fit_args(config, seed, settings.out, settings.extra, settings.wandb)
        problem = _parse_problem(args)
        if problem is not None:
            where = " (with the --set options)" if settings.extra else ""
            raise MMLearnError(f"config {config!r}{where}: {problem}")


def check_metrics(metrics: Sequence[str]) -> list[str]:
    """``--metrics`` without repeats; each must be a test metric (the only ones a run records)."""
    bad = [m for m in metrics if not m.startswith("test/") or m == "test/"]
    if bad:
        raise MMLearnError(
            f"--metrics {' '.join(bad)}: not a test metric; a compare records the test metrics "
            "only: test/acc, test/f1, test/loss, test/acc/<modality>"
        )
    return list(dict.fromkeys(metrics))


def writable_folder(out: Path, where: str, hint: str = "") -> None:
    """Make ``out`` a folder and check that a file can be written there.

    Args:
        where: how errors name it (``--out runs/x``); ``hint``: what they add (``; give ...``).

    Raises:
        MMLearnError: ``out`` is a file, or cannot be created or written.
    """
    if out.exists() and not out.is_dir():
        raise MMLearnError(f"{where}: exists and is not a folder{hint}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise MMLearnError(f"{where}: cannot write there ({exc.strerror or exc}){hint}") from exc


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` a writable folder without an earlier compare's reports (overwrite: delete)."""
    earlier = [name for name in REPORTS if (out / name).exists()]
    if earlier and not overwrite:
        raise MMLearnError(
            f"--out {out} holds an earlier compare's {', '.join(earlier)}: pass another --out, "
            "or --overwrite to replace them"
        )
    writable_folder(out, f"--out {out}")
    for name in earlier:
        (out / name).unlink()


# ---- recording outcomes as they come -------------------------------------------------------


def _replace_csv(path: Path, rows: Sequence[Row]) -> None:
    """Write ``rows`` to ``path`` in one step: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_csv(tmp, rows)
    os.replace(tmp, path)


def progress_line(k: int, total: int, outcome: Outcome, metric: str) -> str:
    """``[k/N] strategy seed S: metric value  wall s  run folder``, or the failure's line."""
    task = outcome.task
    took = "?" if math.isnan(outcome.wall_s) else f"{outcome.wall_s:.1f}"
    if outcome.row is None:
        return (
            f"[{k}/{total}] FAILED {task.strategy} seed {task.seed} ({task.config}): "
            f"{outcome.error}  ({took} s)"
        )
    value = outcome.row.get(metric)
    shown = "n/a" if value is None else f"{float(value):.4f}"
    fraction = "" if task.fraction is None else f" (train_fraction {task.fraction:g})"
    return (
        f"[{k}/{total}] {task.strategy} seed {task.seed}{fraction}: {metric} {shown}  {took} s  "
        f"{outcome.row.get('run_dir')}"
    )


class _Record:
    """The outcomes so far, on disk after each one (a killed compare keeps what finished)."""

    def __init__(self, out: Path, total: int, metric: str) -> None:
        self.out, self.total, self.metric = out, total, metric
        self.rows: dict[int, Row] = {}
        self.failures: list[Outcome] = []

    @property
    def count(self) -> int:
        return len(self.rows) + len(self.failures)

    def ordered_rows(self) -> list[Row]:
        """The rows in the order of the runs (configs within seeds), however they finished."""
        return [self.rows[i] for i in sorted(self.rows)]

    def add(self, outcome: Outcome) -> None:
        if outcome.row is not None:
            self.rows[outcome.task.index] = outcome.row
            _replace_csv(self.out / "results.csv", self.ordered_rows())
        else:
            self.failures.append(outcome)
            _replace_csv(self.out / "failures.csv", failure_rows(self.failures))
            with open(self.out / "failures.log", "a") as f:
                task = outcome.task
                f.write(f"=== {task.config} seed {task.seed}: {outcome.error}\n{outcome.detail}\n")
        print(progress_line(self.count, self.total, outcome, self.metric), flush=True)


def failure_rows(failures: Sequence[Outcome]) -> list[Row]:
    return [
        {
            "config": o.task.config,
            "strategy": o.task.strategy,
            "seed": o.task.seed,
            "error": o.error,
            "wall_s": round(o.wall_s, 1),
        }
        for o in sorted(failures, key=lambda o: o.task.index)
    ]


def failures_markdown(failures: Sequence[Outcome], total: int) -> str:
    """The failed runs as a Markdown table ('' when none failed)."""
    if not failures:
        return ""
    lines = [
        f"**Failed runs** ({len(failures)} of {total}; not in the tables above)",
        "",
        "| config | seed | error |",
        "|---|---|---|",
    ]
    for r in failure_rows(failures):
        error = str(r["error"]).replace("|", "\\|")
        lines.append(f"| {r['config']} | {r['seed']} | {error} |")
    return "\n".join(lines)


# ---- running: in this process, or in worker processes that die with it --------------------


class _Signals:
    """While installed, SIGTERM and SIGINT raise :class:`Stopped` in the main thread.

    Inside :meth:`deferred` blocks (starting a worker, recording an outcome) the signal is held
    and raised at the block's end, so no worker is started without being tracked for stopping.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping = False  # cleaning up: record further signals, raise nothing
        self._defer = 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if not self._defer and not self.stopping:
            raise Stopped(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if not self._defer and not self.stopping and self.received is not None:
            raise Stopped(self.received)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent(parent: int) -> None:
    """Make this worker end when the compare (pid ``parent``) that started it ends, however.

    On Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker when its parent
    thread ends, even when the compare itself is SIGKILLed and no handler of it runs. The compare
    starts workers from its main thread only, so that thread's end is the process's end. Where
    prctl is missing, and for a parent that died before the call, a daemon thread checks
    ``getppid()`` every second. (The compare's SIGTERM/SIGINT handler stops workers directly.)
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _worker(conn: Connection, parent: int, task: Task, settings: Settings, threads: int) -> None:
    """A worker process: one task, its outcome sent back on ``conn``."""
    _die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the compare stops its workers itself. (A fit's
    # checkpoint callback may still take SIGINT, to end its fit cleanly.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(threads)  # N processes share the cores instead of oversubscribing
    try:
        with _quiet():
            outcome = attempt(task, settings)
    except Stopped as stop:  # the compare is stopping it: no outcome, no traceback
        raise SystemExit(128 + stop.signum) from None
    conn.send(outcome)
    conn.close()


def _stop(processes: Sequence[BaseProcess]) -> None:
    """SIGTERM the workers still running, then SIGKILL those not gone after STOP_GRACE_S."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)


def _receive(conn: Connection, proc: BaseProcess, task: Task, started: float) -> Outcome:
    """The outcome a worker sent, or its death as the task's failure (OOM kill, segfault)."""
    outcome: Any = None
    with contextlib.suppress(EOFError, OSError):
        outcome = conn.recv()
    conn.close()
    proc.join(30.0)  # it has sent its outcome and is exiting
    if proc.is_alive():
        proc.kill()
        proc.join(5.0)
    if isinstance(outcome, Outcome):
        return outcome
    code = proc.exitcode
    if code is not None and code < 0:
        why = f"killed by {signal.Signals(-code).name}"
        why += " (out of memory?)" if -code == signal.SIGKILL else ""
    else:
        why = f"exit status {code}"
    error = f"the worker process ended without a result: {why}"
    return Outcome(task, time.monotonic() - started, error=error)


def run_in_processes(
    tasks: Sequence[Task],
    settings: Settings,
    jobs: int,
    done: Callable[[Outcome], None],
    signals: _Signals | None = None,
) -> None:
    """Run ``tasks`` ``jobs`` at a time, each in a fresh spawned process; ``done`` each outcome.

    One worker per task (no state carried from one run to the next), started from this thread;
    a worker that dies (OOM kill, segfault) fails its own task only. On any exit from here,
    :class:`Stopped` included, the workers still running are stopped.
    """
    signals = signals or _Signals()
    ctx = multiprocessing.get_context("spawn")  # no forked torch/W&B state
    threads = max(1, (os.cpu_count() or 1) // jobs)
    queue = list(tasks)
    running: dict[Connection, tuple[BaseProcess, Task, float]] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                with signals.deferred():  # every started worker is in `running`, to be stopped
                    task = queue.pop(0)
                    receive, send = ctx.Pipe(duplex=False)
                    proc: BaseProcess = ctx.Process(
                        target=_worker,
                        args=(send, os.getpid(), task, settings, threads),
                        name=f"mmlearn-compare-{task.strategy}-seed{task.seed}",
                        daemon=True,
                    )
                    proc.start()
                    send.close()  # only the worker's copy is left: EOF here if it dies silently
                    running[receive] = (proc, task, time.monotonic())
            for ready in wait(list(running)):
                with signals.deferred():
                    assert isinstance(ready, Connection)
                    worker, task, started = running.pop(ready)
                    done(_receive(ready, worker, task, started))
    finally:
        signals.stopping = True
        _stop([proc for proc, _, _ in running.values()])
        signals.stopping = False


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

    A run's test metrics are the last ``test/acc`` row of its ``metrics.csv`` (``--test_after_fit``)
    or, later in the list, of ``RUN/test/metrics.csv`` (``mmlearn test`` on its checkpoint).

    Returns:
        (rows, skipped): ``skipped`` names runs that hold no test metrics yet.
    """
    rows: list[Row] = []
    skipped: list[str] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise MMLearnError(f"--collect {folder!r}: no such folder")
        for config in sorted(Path(folder).rglob("config.yaml")):
            # the fit's own metrics (--test_after_fit), then `mmlearn test` into the run (RUN/test)
            files = [config.parent / "metrics.csv", config.parent / "test" / "metrics.csv"]
            files = [f for f in files if f.is_file()]
            if not files:
                continue
            cfg = yaml.safe_load(config.read_text()) or {}
            tested = []
            for metrics_file in files:
                with open(metrics_file, newline="") as f:
                    tested += [r for r in csv.DictReader(f) if r.get("test/acc")]
            if not tested:
                skipped.append(str(config.parent))
                continue
            row: Row = {"strategy": _label(cfg), "seed": cfg.get("seed_everything")}
            row |= {k: float(v) for k, v in tested[-1].items() if k.startswith("test/") and v}
            fraction = ((cfg.get("data") or {}).get("init_args") or {}).get("train_fraction")
            if fraction not in (None, 1, 1.0):
                row["train_fraction"] = float(fraction)
            evaluations = sorted(
                (config.parent / "evaluate").glob("*/evaluation.json"),
                key=lambda p: p.stat().st_mtime,
            )
            if evaluations:  # the newest `mmlearn evaluate` of the run
                row["evaluation"] = str(evaluations[-1])
            rows.append(row | {"run_dir": str(config.parent)})
    if not rows:
        raise MMLearnError(
            f"--collect {list(folders)}: found no run with test metrics (a config.yaml beside a "
            "metrics.csv holding test/acc); fit with --test_after_fit=true or run `mmlearn test`"
        )
    return rows, skipped


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's loggers at WARNING meanwhile, then as they were (an in-process compare must
    not silence what runs after it)."""
    # one table is the output; Lightning's per-run banners would bury it
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _log_to_wandb(
    out: Path, summary: Sequence[Row], table: str, extra: Sequence[Path] = ()
) -> None:
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
        | {f"compare/{p.stem}": wandb.Image(str(p)) for p in extra if p.suffix == ".png"}
        | {f"compare/{p.stem}": _csv_table(wandb, p) for p in extra if p.suffix == ".csv"}
    )
    for p in extra:
        if p.suffix == ".md":
            run.summary[f"compare/{p.stem}"] = p.read_text()
    run.summary["compare/markdown"] = table
    run.finish()


def _csv_table(wandb: Any, path: Path) -> Any:
    """A CSV report as a W&B Table (``evaluation_summary.csv``: every measure over seeds)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return wandb.Table(columns=rows[0], data=rows[1:])


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _report(
    out: Path,
    rows: list[Row],
    failures: Sequence[Outcome],
    total: int,
    strategies: list[str],
    metrics: list[str],
    baseline: str,
    wandb: bool,
    evaluate: bool = False,
) -> None:
    """Write and print the summary of ``rows`` (and list ``failures``).

    The tables are of the runs at the largest training fraction (all of them without
    ``--train_fractions``); ``results.csv`` and the risk curves have every run.
    """
    failed = failures_markdown(failures, total)
    if not rows:
        print(f"\nno run finished: nothing to summarise\n\n{failed}", flush=True)
        (out / "summary.md").write_text(failed + "\n")
        return
    finished = [s for s in strategies if any(r["strategy"] == s for r in rows)]
    if baseline not in finished:
        print(f"note: no run of the baseline {baseline} finished; pairing with {finished[0]}")
        baseline = finished[0]
    for metric in metrics:
        if not any(metric in r for r in rows):
            logged = sorted({k for r in rows for k in r if k.startswith("test/")})
            print(f"note: no run logged {metric} (the runs logged {', '.join(logged)})")
    _replace_csv(out / "results.csv", rows)
    every = rows
    top = max(float(r.get("train_fraction", 1.0)) for r in rows)
    rows = [r for r in rows if float(r.get("train_fraction", 1.0)) == top]
    summary = summarise(rows, metrics, baseline)
    if summary:
        write_csv(out / "summary.csv", summary)
    table = markdown_table(summary, baseline, strategies, metrics)
    note = compare_eval.seeds_note(rows, finished, baseline)
    if note:
        table += f"\n\nNote: {note}."
    if top != 1.0:
        table = f"(runs at train_fraction {top:g})\n\n" + table
    budget, _ = protocol(every, finished)
    (out / "protocol.md").write_text(budget + "\n")
    table += "\n\nTraining protocol (from each run's config.yaml):\n\n" + budget
    (out / "summary.md").write_text(table + ("\n\n" + failed if failed else "") + "\n")
    drawn = plot(rows, summary, out / "comparison.png", strategies)
    evaluation, eval_files = "", list[Path]()
    if evaluate or any(r.get("evaluation") for r in every):
        evaluation, eval_files = compare_eval.report(out, every, strategies, baseline)
    if wandb and drawn:
        _log_to_wandb(out, summary, table, eval_files)
    files = f"per run: {out / 'results.csv'}"
    files += f"   plot: {out / 'comparison.png'}" if drawn else ""
    if eval_files:
        table += "\n\n" + evaluation
        files += "\nevaluation: " + ", ".join(str(f) for f in eval_files)
    if failed:
        failed += f"\n\nfailed runs: {out / 'failures.csv'}, tracebacks: {out / 'failures.log'}"
    print("\n" + table + ("\n\n" + failed if failed else "") + f"\n\n{files}", flush=True)


def compare_main(argv: Sequence[str]) -> int:
    """``mmlearn compare``: 0 when every run finished, 1 when one failed, 128+N on signal N."""
    parser = argparse.ArgumentParser(
        prog="mmlearn compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("configs", nargs="*", help="experiment configs, one per strategy")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="runs/compare", help="where runs and reports go")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the reports of an earlier compare in --out (default: refuse such a folder)",
    )
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
        "--evaluate",
        action="store_true",
        help="evaluate every run's best checkpoint (missing modalities, calibration, Shapley "
        "values, probes) and summarise across strategies (with --collect: read the runs' "
        "evaluations)",
    )
    parser.add_argument(
        "--train_fractions",
        nargs="+",
        type=float,
        metavar="F",
        help="also run every config and seed at these training fractions (the DataModule's "
        "train_fraction), for the risk curve; the tables are of the largest",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="log every run and the comparison to W&B (offline without an account)",
    )
    args = parser.parse_args(list(argv))
    with _quiet():
        return _compare(parser, args)


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """:func:`compare_main` after parsing: collect, or check, run and report."""
    out = Path(args.out)
    metrics = check_metrics(args.metrics)
    if args.collect:
        if args.configs:
            parser.error("give configs to run, or --collect folders, not both")
        prepare_out(out, args.overwrite)
        rows, skipped = collect(args.collect)
        for run in skipped:
            print(f"skipped (no test metrics): {run}")
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        baseline = args.baseline or strategies[0]
        if baseline not in strategies:
            raise MMLearnError(f"--baseline {baseline!r} is not among the strategies {strategies}")
        _report(out, rows, [], len(rows), strategies, metrics, baseline, args.wandb, args.evaluate)
        return 0
    if not args.configs:
        parser.error("give at least one experiment config (or --collect DIR)")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: expected >= 1")
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:
        raise MMLearnError(f"--seeds: {repeated} given twice (runs are paired by seed)")
    fractions = _fractions(args.train_fractions)
    settings = Settings(out, tuple(f"--{kv}" for kv in args.set), args.wandb, args.evaluate)
    check_configs(args.configs, args.seeds[0], settings)
    strategies = [strategy_label(c) for c in args.configs]
    baseline = args.baseline or strategies[0]
    if baseline not in strategies:
        raise MMLearnError(
            f"--baseline {baseline!r} is not among the compared strategies {strategies} "
            "(a strategy's label is its config's file name)"
        )
    prepare_out(out, args.overwrite)
    runs = [(c, s, f) for f in fractions for s in args.seeds for c in args.configs]
    tasks = [Task(i, c, s, f) for i, (c, s, f) in enumerate(runs)]
    jobs = min(args.jobs, len(tasks))
    print(
        f"mmlearn compare: {_count(len(tasks), 'run')} ({_count(len(args.configs), 'config')} x "
        f"{_count(len(args.seeds), 'seed')}"
        + (f" x {_count(len(fractions), 'training fraction')}" if len(fractions) > 1 else "")
        + f"), {jobs} at a time, into {out}",
        flush=True,
    )
    record = _Record(out, len(tasks), metrics[0])
    signals = _Signals()
    try:
        with signals.installed():
            if jobs == 1:
                for task in tasks:
                    outcome = attempt(task, settings)
                    with signals.deferred():
                        record.add(outcome)
            else:
                run_in_processes(tasks, settings, jobs, record.add, signals)
    except Stopped as stop:
        kept = f"the finished ones are in {out / 'results.csv'}" if record.rows else "none passed"
        workers = "; its worker processes are stopped" if jobs > 1 else ""
        print(
            f"mmlearn compare: stopped by {signal.Signals(stop.signum).name} after "
            f"{record.count} of {len(tasks)} runs ({kept}){workers}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + stop.signum
    rows = record.ordered_rows()
    _report(
        out,
        rows,
        record.failures,
        len(tasks),
        strategies,
        metrics,
        baseline,
        args.wandb,
        args.evaluate,
    )
    return 1 if record.failures else 0


def _fractions(given: Sequence[float] | None) -> list[float | None]:
    """``--train_fractions``, checked and sorted (the largest last: the tables' runs)."""
    if not given:
        return [None]
    bad = [f for f in given if not 0 < f <= 1]
    if bad:
        raise MMLearnError(f"--train_fractions {bad}: expected fractions in (0, 1]")
    if len(set(given)) != len(given):
        raise MMLearnError(f"--train_fractions {list(given)}: a fraction is given twice")
    return [float(f) for f in sorted(given)]
