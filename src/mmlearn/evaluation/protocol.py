"""The training protocol every strategy of a comparison got, read from the runs' own configs.

A comparison of strategies is only fair when each was trained under the same budget: the same
optimiser and learning rate, schedule, epochs, batch size and clipping, and the same
hyper-parameter search. ``compare`` writes this table (``protocol.md``, and into
``summary.md``) from the resolved ``config.yaml`` of every run, and says which settings differ.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

#: (column, where in a resolved run config) of the settings that make a budget
FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimiser", ("model", "init_args", "optimizer")),
    ("schedule", ("model", "init_args", "lr_scheduler")),
    ("max_epochs", ("trainer", "max_epochs")),
    ("max_steps", ("trainer", "max_steps")),
    ("batch_size", ("data", "init_args", "batch_size")),
    ("clip_grad_norm", ("model", "init_args", "clip_grad_norm")),
    ("embed_dim", ("model", "init_args", "embed_dim")),
    ("head_hidden", ("model", "init_args", "head_hidden")),
)
#: the settings that must agree for a matched budget
MATCHED = ("optimiser", "schedule", "max_epochs", "max_steps", "batch_size", "clip_grad_norm")


def _get(cfg: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = cfg
    for k in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(k)
    return node


def _defaults(class_path: str) -> dict[str, Any]:
    """The constructor defaults of the class ``class_path`` names (``{}`` if it cannot load)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _plain(value: Any) -> Any:
    """Tuples as lists (a YAML config has no tuples)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def describe(value: Any) -> str:
    """A class-path spec as ``Adam(lr=0.001, weight_decay=0.0001)``: ``lr`` and the arguments
    that differ from the class's defaults (a resolved config lists every one); ``None`` as
    ``none``."""
    if value is None:
        return "none"
    if isinstance(value, Mapping) and "class_path" in value:
        path = str(value["class_path"])
        defaults = _defaults(path)
        args = value.get("init_args") or {}
        shown = {
            k: v
            for k, v in args.items()
            if k == "lr" or k not in defaults or _plain(defaults[k]) != _plain(v)
        }
        inner = ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
        return f"{path.rsplit('.', 1)[-1]}({inner})"
    return str(value)


def settings(run_dir: str | Path) -> dict[str, str] | None:
    """The budget settings of one run (``None`` if it has no readable ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    return {name: describe(_get(cfg, where)) for name, where in FIELDS}


def protocol(rows: Sequence[Mapping[str, Any]], strategies: Sequence[str]) -> tuple[str, bool]:
    """``(markdown, matched)``: one row per strategy, and whether the budget settings agree.

    A strategy whose seeds ran under different settings lists each variant. ``matched`` is
    ``False`` when any of :data:`MATCHED` differs between strategies (named below the table).
    """
    seen: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        s = settings(str(r.get("run_dir", "")))
        if s is None:
            continue
        runs = seen.setdefault(str(r["strategy"]), [])
        if s not in runs:
            runs.append(s)
    names = [n for n, _ in FIELDS]
    lines = [
        "| strategy | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for strategy in strategies:
        for s in seen.get(strategy, []):
            lines.append(f"| {strategy} | " + " | ".join(s[n] for n in names) + " |")
    differ = [n for n in MATCHED if len({s[n] for runs in seen.values() for s in runs}) > 1]
    text = "\n".join(lines)
    text += (
        "\n\nHyper-parameter search: none in this comparison; every strategy ran with its "
        "config's values, one configuration each, for every seed."
    )
    if differ:
        text += (
            "\n\n**Budget NOT matched:** "
            + ", ".join(differ)
            + " differ between strategies; their differences are not only the strategies'."
        )
    elif seen:
        text += (
            "\n\nBudget matched: every strategy had the same optimiser, schedule, epochs, "
            "batch size and clipping."
        )
    return text, not differ
