"""``mmlearn slurm``: fill in one of ``experiments/slurm/*.sbatch`` for a run and submit it.

Three scripts, one job shape each: ``train`` (one config), ``array`` (one config over seeds, one
array task per seed) and ``agent`` (W&B sweep agents). The header's resources are set from the
options; one task per device, so ``--ntasks-per-node`` is the GPU count (Lightning reads
``trainer.devices`` and ``trainer.num_nodes`` back from Slurm inside the script). The filled-in
script is kept beside the job's log under ``<runs>/slurm/``; ``--dry-run`` writes it there too and
prints it with the command that submits it (the same environment a real submission passes), but
submits nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mmlearn.errors import MMLearnError


def render(template: str, directives: dict[str, str | None]) -> str:
    """``template`` with its ``#SBATCH --key=value`` lines set from ``directives``.

    A key already in the header gets the new value (``None`` removes the line); other keys are
    added after the last ``#SBATCH`` line, where Slurm still reads them.
    """
    lines: list[str | None] = list(template.splitlines())
    seen: set[str] = set()
    last = 0
    for i, line in enumerate(template.splitlines()):
        if not line.startswith("#SBATCH "):
            continue
        last = i
        key = line.split()[1].split("=", 1)[0].lstrip("-")
        if key in directives:
            seen.add(key)
            value = directives[key]
            lines[i] = None if value is None else f"#SBATCH --{key}={value}"
    extra = [f"#SBATCH --{k}={v}" for k, v in directives.items() if k not in seen and v is not None]
    lines[last + 1 : last + 1] = extra
    return "\n".join(line for line in lines if line is not None) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlearn slurm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options after `--` go to `mmlearn fit`, e.g. `-- --trainer.max_epochs=50`.",
    )
    p.add_argument("config", nargs="?", help="experiment config to fit (not with --sweep)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (0: CPU job)")
    p.add_argument("--tasks-per-node", type=int, help="processes per node (default: GPUs, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=2)
    p.add_argument("--time", default="04:00:00", help="wall-clock limit, HH:MM:SS")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--mem", help="memory per node, e.g. 32G")
    p.add_argument("--job-name")
    p.add_argument("--seeds", nargs="+", type=int, help="an array job, one task per seed")
    p.add_argument("--sweep", help="ENTITY/PROJECT/SWEEP_ID: submit W&B sweep agents")
    p.add_argument("--count", type=int, default=1, help="trials per agent (with --sweep)")
    p.add_argument("--agents", type=int, default=1, help="agent jobs (with --sweep)")
    p.add_argument(
        "--runs",
        default=os.environ.get("MMLEARN_RUNS", "runs"),
        help="root of the run folders (<runs>/slurm/<job>-<id>)",
    )
    p.add_argument("--templates", default="experiments/slurm", help="folder of the *.sbatch")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="write the script under <runs>/slurm/, print it and the sbatch command "
        "that submits it; submit nothing",
    )
    return p  # fmt: skip


def slurm_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = _parser()
    args = parser.parse_args(argv[:cut])
    fit_options = argv[cut + 1 :]
    if (args.config is None) == (args.sweep is None):
        parser.error("give an experiment config, or --sweep ENTITY/PROJECT/SWEEP_ID")
    if args.config is not None and not Path(args.config).is_file():
        parser.error(f"config {args.config!r} does not exist")
    tasks = args.tasks_per_node or max(args.gpus, 1)
    if args.gpus and tasks != args.gpus:
        parser.error(
            f"--tasks-per-node {tasks} with --gpus {args.gpus}: Lightning runs one process per "
            "device, so they must be equal"
        )
    kind = "agent" if args.sweep else "array" if args.seeds else "train"
    template = Path(args.templates) / f"{kind}.sbatch"
    if not template.is_file():
        parser.error(f"no {template} (run from the repository root, or pass --templates)")
    name = args.job_name or (
        f"mmlearn-{Path(args.config).stem}" if args.config else "mmlearn-agent"
    )
    logs = Path(args.runs) / "slurm"
    directives: dict[str, str | None] = {
        "job-name": name,
        "nodes": str(args.nodes),
        "ntasks-per-node": str(tasks),
        "cpus-per-task": str(args.cpus_per_task),
        "time": args.time,
        "gres": f"gpu:{args.gpus}" if args.gpus else None,
        "partition": args.partition,
        "account": args.account,
        "mem": args.mem,
        "output": str(logs / ("%x-%A_%a.out" if kind != "train" else "%x-%j.out")),
    }
    if kind == "array":
        directives["array"] = ",".join(map(str, args.seeds))
    elif kind == "agent":
        directives["array"] = f"0-{args.agents - 1}" if args.agents > 1 else None
        directives["output"] = str(logs / "%x-%j.out")
    script = render(template.read_text(), directives)
    if kind == "agent":
        job_args = [args.sweep, str(args.count)]
    else:
        accelerator = [] if args.gpus else ["--trainer.accelerator=cpu"]
        job_args = [args.config, *accelerator, *fit_options]
    path = logs / f"{name}.sbatch"
    command = ["sbatch", "--parsable", str(path), *job_args]
    job_env = {"MMLEARN_RUNS": args.runs, "MMLEARN_PYTHON": sys.executable}
    if not args.dry_run and shutil.which("sbatch") is None:
        raise MMLearnError("sbatch not found on PATH: is this a Slurm login node? (--dry-run "
                           "writes and prints the script)")  # fmt: skip
    logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log folder
    path.write_text(script)
    if args.dry_run:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in job_env.items())
        print(script + f"\n# wrote {path} (not submitted); submit it with:\n"
              + f"{prefix} {shlex.join(command)}")  # fmt: skip
        return 0
    env = dict(os.environ, **job_env)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise MMLearnError(f"sbatch {path} refused the job: {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    run = f"{args.runs}/slurm/{name}-{job}" + ("_<seed>" if kind == "array" else "")
    print(f"submitted job {job} ({kind}): script {path}, run folder {run}")
    return 0
