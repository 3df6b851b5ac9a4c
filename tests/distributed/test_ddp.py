"""2 gloo ranks with batch B == 1 process with batch 2B, for every strategy (docs/methods.md 7).

Real ``torch.distributed.run`` launches of Lightning's DDP on CPU: one single-process launch and
one 2-rank launch, each training every case of ``ddp_worker.py`` in turn. Each rank gets a
contiguous half of every global batch; after 5 SGD+momentum steps the parameters (and buffers:
EMA moments, BatchNorm statistics) must equal single-process training to 1e-5, and the two ranks
must hold identical ones. The cases: every registered strategy with its defaults, MGDA with scope
global and per_group, every moments estimator, ``every=2``, torchjd's UPGrad and PCGrad through
the TorchJD rule (skipped without torchjd), and a BatchNorm encoder (synchronised
by the base module under DDP: ``CPUSyncBatchNorm`` here, on gloo). The deliberately wrong
variants (a rule on rank-local statistics, MIMO's weights from rank-local losses) must be told
apart; the same wrong step with the linear ``Sum`` rule is the control that must not be.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import BN_CASES, CASES, TORCHJD_CASES, WRONG, ShardedSynthetic, build

from helpers import STRATEGY_OPTIONS, require
from mmlearn.gradients import MGDA
from mmlearn.gradients.torchjd import INSTALL_HINT
from mmlearn.gradients.torchjd import available as torchjd_available
from mmlearn.strategies import STRATEGIES, Microbatch, MultiObjective

WORKER = Path(__file__).with_name("ddp_worker.py")
#: the cases this environment can build: the TorchJD ones need torchjd (skipped without it)
BUILDABLE = [c for c in CASES if torchjd_available() or c not in TORCHJD_CASES]
TRAINED = [*BUILDABLE, *BN_CASES]
WRONG_TRAINED = [w for w, case in WRONG.items() if case in BUILDABLE]


def _needs(case: str) -> None:
    if case in TORCHJD_CASES:
        require(torchjd_available(), f"{case} needs torchjd: {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(out: Path, cases: list[str], world: int, batch: int) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = [str(WORKER), str(out), *cases, f"--batch={batch}"]
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
    _run(root / "single", TRAINED, world=1, batch=32)
    _run(root / "ddp", [*TRAINED, *WRONG_TRAINED], world=2, batch=16)
    return root


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def _load(folder: Path, name: str) -> dict[str, torch.Tensor]:
    errors = sorted(folder.glob("error-rank*.txt"))
    if errors:
        text = errors[0].read_text()
        pytest.fail(f"{folder.name} raised on {errors[0].stem}:\n{text[-3000:]}")
    state = torch.load(folder / name)
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _check_equal(runs: Path, case: str) -> None:
    single = _load(runs / "single" / case, "rank0.pt")
    r0 = _load(runs / "ddp" / case, "rank0.pt")
    r1 = _load(runs / "ddp" / case, "rank1.pt")
    assert _max_diff(r0, r1) == 0.0, "replicas diverged"
    assert _max_diff(single, r0) < 1e-5
    # not vacuous: the parameters really moved during the 5 steps
    assert _max_diff(_load(runs / "single" / case, "init.pt"), single) > 1e-2


def test_the_cases_cover_every_strategy_estimator_scope_and_every() -> None:
    assert set(STRATEGIES) <= set(CASES)  # a newly registered strategy is covered by default
    assert set(STRATEGY_OPTIONS) <= set(CASES)  # and so is every variant the CLI tests run
    data = ShardedSynthetic(16, 0, 1, num_modalities=3, dim=[6, 5, 4], num_classes=3)
    models = [build(case, data) for case in BUILDABLE]
    manual = [m for m in models if isinstance(m, MultiObjective)]

    def estimator(m: MultiObjective) -> str:
        chunks = f"({m.moments.n_chunks})" if isinstance(m.moments, Microbatch) else ""
        return type(m.moments).__name__ + chunks

    estimators = {estimator(m) for m in manual}
    assert estimators == {"BatchRows", "EMAMoments", "Microbatch(4)", "Microbatch(2)", "LastLayer"}
    assert {m.rule.scope for m in manual if isinstance(m.rule, MGDA)} == {"global", "per_group"}
    assert {type(m.rule).__name__ for m in manual if m.every == 2} == {"MGDA", "BOGCCalibration"}
    # torchjd's aggregators through the TorchJD rule: UPGrad and the randomised PCGrad
    assert {c.removeprefix("TorchJD-") for c in TORCHJD_CASES} == {"UPGrad", "PCGrad"}
    assert "TorchJD-UPGrad" in WRONG.values()  # a non-linear aggregator on rank-local rows
    assert set(BN_CASES.values()) <= set(CASES) and set(WRONG.values()) <= set(CASES)
    # the BatchNorm sample covers both automatic optimisation and the manual gradient step
    images = ShardedSynthetic(16, 0, 1, image=True, num_modalities=2, dim=[64, 5], num_classes=3)
    assert {build(case, images).automatic_optimization for case in BN_CASES} == {True, False}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_on_the_doubled_batch(runs: Path, case: str) -> None:
    _needs(case)
    _check_equal(runs, case)


@pytest.mark.parametrize("case", list(BN_CASES))
def test_batchnorm_encoder_two_ranks_equal_one_process(runs: Path, case: str) -> None:
    # the base module synchronises BatchNorm under DDP (CPUSyncBatchNorm on gloo): each rank
    # normalises with the statistics of the whole global batch, as the single process does
    _check_equal(runs, case)


@pytest.mark.parametrize("case", list(WRONG))
def test_rank_local_statistics_are_caught(runs: Path, case: str) -> None:
    _needs(WRONG[case])
    single = _load(runs / "single" / WRONG[case], "rank0.pt")
    r0 = _load(runs / "ddp" / case, "rank0.pt")
    r1 = _load(runs / "ddp" / case, "rank1.pt")
    # the replicas' parameters agree (the rank-local EMA moments of BOGC-local do not)...
    params = [k for k in r0 if not k.startswith("moments.")]
    assert _max_diff({k: r0[k] for k in params}, {k: r1[k] for k in params}) == 0.0
    if case == "Sum-local":
        # control: the rank-local mean of a linear rule IS the right gradient, so the wrong
        # step differs from the right one only where a rule is not linear in its inputs
        assert _max_diff(single, r0) < 1e-5
    else:
        assert _max_diff(single, r0) > 1e-3  # ...but not with the single-process result
