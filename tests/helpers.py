"""Shared test constants (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

# every strategy, as the CLI arguments that choose it (MGDA is MultiObjective with its rule)
STRATEGIES = [
    ["--model", "InterOnly"],
    ["--model", "IntraOnly"],
    ["--model", "I2M2"],
    ["--model", "MIMO"],
    ["--model", "BOGC"],
    ["--model", "MultiObjective", "--model.rule=mmlearn.gradients.MGDA"],
]
