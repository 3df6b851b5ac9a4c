"""Shared fixtures: the real mfeat data, a CLI runner that keeps every run under tmp_path."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest

from helpers import require  # noqa: I001  (tests/helpers.py)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mfeat_root() -> Path:
    """The prepared UCI Multiple Features folder (``make test`` prepares it first)."""
    root = Path(os.environ.get("MMLEARN_DATA", REPO / "data"))
    require(
        (root / "mfeat" / "mfeat-fou").is_file(),
        f"mfeat is not prepared under {root}: run `make data` (mmlearn prepare mfeat)",
    )
    return root


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """Debian's Fashion-MNIST (``apt-get install dataset-fashion-mnist``; ``.ci/run`` does)."""
    from mmlearn.data.fashion import SYSTEM_DIR

    require(
        (SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
        f"no Fashion-MNIST in {SYSTEM_DIR} (apt-get install dataset-fashion-mnist)",
    )
    return SYSTEM_DIR


@pytest.fixture(autouse=True)
def _no_leaked_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``seed_everything`` sets ``PL_GLOBAL_SEED`` (DataModules follow it): start clean."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def run_cli(tmp_path: Path):
    """``run_cli(*args)`` runs ``mmlearn <args>`` in-process with runs saved under tmp_path."""
    from mmlearn.cli import build_cli

    def run(*args: str, save_dir: Path | None = None, extra: Sequence[str] = ()):
        out = save_dir or tmp_path / "runs"
        full = [
            *args,
            f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.default_root_dir={out}",
            *QUIET,
            *extra,
        ]
        return build_cli(full)

    return run
