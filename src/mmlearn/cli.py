"""The ``mmlearn`` command: Lightning's subcommands plus the project commands, one-line errors.

``mmlearn fit|validate|test|predict`` run the LightningCLI of :mod:`mmlearn.lightning_cli`;
``mmlearn prepare <dataset>``, ``mmlearn compare <configs...>`` and ``mmlearn slurm <config>``
are the project commands. A user error (bad config, bad data) ends the program with one
``mmlearn: error:`` line and exit status 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml

from mmlearn.data import DATA_MODULES, MultimodalDataModule
from mmlearn.errors import MMLearnError, user_error
from mmlearn.evaluation.compare import compare_main
from mmlearn.lightning_cli import MMLearnCLI, build_cli
from mmlearn.prepare import prepare_main
from mmlearn.runtime import keep_freed_memory
from mmlearn.slurm import slurm_main
from mmlearn.strategies import STRATEGIES, MultimodalModule

__all__ = ["MMLearnCLI", "build_cli", "check_choices", "main"]

PROJECT_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "prepare": prepare_main,
    "compare": compare_main,
    "slurm": slurm_main,
}

#: what ``--model`` and ``--data`` choose from: the registries the tests are parametrised over
CHOICES: dict[str, tuple[Mapping[str, type], type, str]] = {
    "model": (STRATEGIES, MultimodalModule, "strategy"),
    "data": (DATA_MODULES, MultimodalDataModule, "data module"),
}


def _resolve(value: object, base: Path | None = None) -> object:
    """A ``--model``/``--data`` value read as jsonargparse reads it: a file, YAML, or a name.

    A relative file name is relative to ``base`` (the config file's folder) when given, else to
    the working directory.
    """
    if not isinstance(value, str):
        return value
    path = Path(value) if base is None else base / value
    try:
        if path.is_file():
            return yaml.safe_load(path.read_text())
        return yaml.safe_load(value)
    except (OSError, yaml.YAMLError):
        return value


def _class_path(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("class_path")
    return value if isinstance(value, str) else None


def _check_choice(value: object, key: str, origin: str) -> None:
    """Raise a clear error when ``value`` names no registered or importable class for ``key``."""
    registry, base, what = CHOICES[key]
    class_path = _class_path(value)
    if class_path is None:
        return  # a config without class_path: jsonargparse reports what is missing
    name = class_path.rsplit(".", 1)[-1]
    if name in registry and (class_path == name or registry[name].__module__ in class_path):
        return
    if "." in class_path:
        module, attr = class_path.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, TypeError, ValueError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, base):
            return
    raise MMLearnError(f"unknown {what} {class_path!r} (from {origin}); valid: {sorted(registry)}")


def check_choices(args: Sequence[str]) -> None:
    """Check the strategy and DataModule named by ``--model``/``--data`` or in a ``--config``."""
    for i, arg in enumerate(args):
        key, _, value = arg[2:].partition("=")
        if not arg.startswith("--") or (key not in CHOICES and key != "config"):
            continue
        if not value and i + 1 < len(args):
            value = args[i + 1]
        if key in CHOICES:
            _check_choice(_resolve(value), key, origin=f"--{key}")
            continue
        cfg = _resolve(value) if Path(value).is_file() else None
        if isinstance(cfg, Mapping):
            for k in CHOICES:
                if k in cfg:
                    choice = _resolve(cfg[k], base=Path(value).parent)
                    _check_choice(choice, k, origin=f"{value}, key {k!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``mmlearn`` console script.

    User errors (bad config, bad data) end the program with one ``mmlearn: error:`` line and
    exit status 2; anything else keeps its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    try:
        if args and args[0] in PROJECT_COMMANDS:
            sys.exit(PROJECT_COMMANDS[args[0]](args[1:]))
        check_choices(args)
        build_cli(None if argv is None else args)
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        print(f"mmlearn: error: {err}", file=sys.stderr)
        sys.exit(2)
