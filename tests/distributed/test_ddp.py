"""2 gloo ranks with batch B == 1 process with batch 2B, for every strategy (METHODS.md 7).

Real ``torch.distributed.run`` launches of Lightning's DDP on CPU. Each rank gets a contiguous
half of every global batch; after 5 SGD+momentum steps the parameters must equal single-process
training to 1e-5, and the two ranks must hold identical parameters. The negative test applies a
rule to rank-local statistics and must be told apart.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
STRATEGIES = [
    "InterOnly",
    "IntraOnly",
    "I2M2",
    "MIMO",
    "Sum",
    "MGDA",
    "BOGC",
    "BOGC-microbatch",
    "BOGC-last_layer",
]
LOCAL = ["MIMO", "MGDA", "BOGC"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(out: Path, strategies: list[str], world: int, batch: int, extra: tuple = ()) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = [str(WORKER), str(out), *strategies, f"--batch={batch}", *extra]
    if world > 1:
        launch = [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            f"--master_port={_free_port()}",
        ]
        args = [*launch, *args]
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _run(root / "single", STRATEGIES, world=1, batch=32)
    _run(root / "ddp", STRATEGIES, world=2, batch=16)
    _run(root / "local", LOCAL, world=2, batch=16, extra=("--local-statistics",))
    return root


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def _load(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path)
    return {k: v for k, v in state.items() if v.is_floating_point()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_equal_one_process_on_the_doubled_batch(runs: Path, strategy: str) -> None:
    single = _load(runs / "single" / strategy / "rank0.pt")
    r0 = _load(runs / "ddp" / strategy / "rank0.pt")
    r1 = _load(runs / "ddp" / strategy / "rank1.pt")
    assert _max_diff(r0, r1) == 0.0, "replicas diverged"
    assert _max_diff(single, r0) < 1e-5
    # not vacuous: the parameters really moved during the 5 steps
    assert _max_diff(_load(runs / "single" / strategy / "init.pt"), single) > 1e-2


@pytest.mark.parametrize("strategy", LOCAL)
def test_rank_local_statistics_are_caught(runs: Path, strategy: str) -> None:
    single = _load(runs / "single" / strategy / "rank0.pt")
    r0 = _load(runs / "local" / strategy / "rank0.pt")
    r1 = _load(runs / "local" / strategy / "rank1.pt")
    assert _max_diff(r0, r1) == 0.0  # ranks agree with each other...
    assert _max_diff(single, r0) > 1e-3  # ...but not with the single-process result
