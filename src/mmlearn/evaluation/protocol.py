"""The training protocol every strategy of a comparison got, read from the runs' own configs.

A comparison of strategies is only fair when each was trained under the same budget: the same
data, optimiser and learning rate, schedule, epochs, batch size and clipping, and the same
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
    ("data", ("data",)),
    ("optimiser", ("model", "init_args", "optimizer")),
    ("schedule", ("model", "init_args", "lr_scheduler")),
    ("max_epochs", ("trainer", "max_epochs")),
    ("max_steps", ("trainer", "max_steps")),
    ("batch_size", ("data", "init_args", "batch_size")),
    ("clip_grad_norm", ("model", "init_args", "clip_grad_norm")),
    ("steps/batch", ("model", "class_path")),
    ("encoders", ("model", "init_args", "encoders")),
    ("embed_dim", ("model", "init_args", "embed_dim")),
    ("head_hidden", ("model", "init_args", "head_hidden")),
)
#: the settings that must agree for a matched budget
MATCHED = (
    "data",
    "optimiser",
    "schedule",
    "max_epochs",
    "max_steps",
    "batch_size",
    "clip_grad_norm",
)
#: the model's own settings: a method may need its own (OGM-GE's linear head), so a difference
#: is named but does not unmatch the budget
MODEL = ("encoders", "embed_dim", "head_hidden")
#: data options that are not the data: the seed (one per run), where it lives, how it loads,
#: and the training fraction (compare --train_fractions varies it on purpose)
NOT_DATA = {"seed", "root", "path", "batch_size", "num_workers", "predict_split", "train_fraction"}


def _get(cfg: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = cfg
    for k in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(k)
    return node


def _load(class_path: Any) -> Any:
    """The object ``class_path`` names, or ``None`` when it cannot be imported."""
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _defaults(class_path: str) -> dict[str, Any]:
    """The constructor defaults of the class ``class_path`` names (``{}`` if it cannot load)."""
    try:
        params = inspect.signature(_load(class_path)).parameters.values()
    except (ValueError, TypeError):  # None, or a class without a signature
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


def _data(spec: Any) -> str:
    """The DataModule and the options that choose the data (not the seed, paths or loading)."""
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        return describe(spec)
    args = {k: v for k, v in (spec.get("init_args") or {}).items() if k not in NOT_DATA}
    return describe({"class_path": spec["class_path"], "init_args": args})


def _steps_per_batch(class_path: Any) -> str:
    """Optimiser steps per batch of the strategy (MLA: one per modality)."""
    cls = _load(class_path)
    return "?" if cls is None else str(getattr(cls, "optimizer_steps_per_batch", "1"))


def settings(run_dir: str | Path) -> dict[str, str] | None:
    """The budget settings of one run (``None`` if it has no readable ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    out = {}
    for name, where in FIELDS:
        value = _get(cfg, where)
        if name == "data":
            out[name] = _data(value)
        elif name == "steps/batch":
            out[name] = _steps_per_batch(value)
        elif name == "encoders":
            out[name] = "default" if not value else str(_plain(value)).replace("'", "")
        else:
            out[name] = describe(value)
    return out


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

    def varies(n: str) -> bool:
        return len({s[n] for runs in seen.values() for s in runs}) > 1

    differ = [n for n in MATCHED if varies(n)]
    model = [n for n in MODEL if varies(n)]
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
            "\n\nBudget matched: every strategy had the same data, optimiser, schedule, "
            "epochs, batch size and clipping."
        )
    if model:
        text += (
            "\n\nModel settings that differ between strategies: "
            + ", ".join(model)
            + " (a method may need its own, e.g. OGM-GE's and MLA's linear head)."
        )
    if any(s["steps/batch"] != "1" for runs in seen.values() for s in runs):
        text += (
            "\n\nsteps/batch: optimiser steps per batch (MLA: one per modality, so it takes M "
            "times the others' steps in the same epochs)."
        )
    return text, not differ
