"""The ``mmlearn`` command: Lightning's subcommands plus the project commands, one-line errors.

``mmlearn fit|validate|test|predict`` run the LightningCLI of :mod:`mmlearn.lightning_cli`;
``mmlearn prepare <dataset>``, ``mmlearn compare <configs...>`` and ``mmlearn slurm <config>``
are the project commands. A user error ends the program with one ``mmlearn: error:`` line and
exit status 2 (:func:`explain`): a bad value (the constructors' checks), an option jsonargparse
refuses (an unknown key gets the closest valid one), a config file that is missing or not YAML,
an accelerator the machine lacks, an output folder that cannot be written.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI

from mmlearn.data import DATA_MODULES, MultimodalDataModule
from mmlearn.errors import MMLearnError, chain, user_error
from mmlearn.evaluation.command import evaluate_main
from mmlearn.evaluation.compare import compare_main
from mmlearn.lightning_cli import MMLearnCLI, build_cli
from mmlearn.prepare import prepare_main
from mmlearn.runtime import keep_freed_memory
from mmlearn.slurm import slurm_main
from mmlearn.strategies import STRATEGIES, MultimodalModule, step

__all__ = ["MMLearnCLI", "build_cli", "check_choices", "main"]

PROJECT_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "prepare": prepare_main,
    "compare": compare_main,
    "evaluate": evaluate_main,
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


# ---- commands and the overview -----------------------------------------------------------------

#: the LightningCLI's subcommands, each with its line in ``mmlearn --help``
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a strategy (a run folder: config, checkpoints, metrics)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "write a checkpoint's predictions (predictions.csv)",
}
#: the project commands' lines in ``mmlearn --help``; a command missing here shows the first
#: line of its function's docstring
PROJECT_HELP: dict[str, str] = {
    "prepare": "put a dataset's files where its DataModule reads them (prepare mfeat)",
    "compare": "fit and test strategies over seeds, then report mean, CI and paired tests",
    "evaluate": "why a run predicts as it does: missing modalities, calibration, Shapley, probes",
    "slurm": "fill in a Slurm script for a config and submit it (--dry-run: write only)",
}


def commands() -> dict[str, str]:
    """Every command of ``mmlearn`` -> its one-line description."""
    out = dict(LIGHTNING_COMMANDS)
    for name, fn in PROJECT_COMMANDS.items():
        doc = (fn.__doc__ or "").strip().splitlines()
        out[name] = PROJECT_HELP.get(name) or (doc[0].rstrip(".") if doc else "")
    return out


def overview() -> str:
    """``mmlearn --help``: every command on one line."""
    table = commands()
    width = max(map(len, table)) + 2
    lines = [
        "usage: mmlearn <command> [options]",
        "",
        "mmlearn: compare multi-modal learning strategies under one Lightning Trainer.",
        "",
        "commands:",
        *(f"  {name:<{width}}{text}" for name, text in table.items()),
        "",
        "`mmlearn <command> --help` lists a command's options; e.g. `mmlearn fit --config "
        "experiments/mfeat/i2m2.yaml`.",
        "Runs go to <trainer.default_root_dir>/<Data>/<Strategy>/version_N (default root: runs).",
    ]
    return "\n".join(lines)


def _check_command(args: Sequence[str]) -> None:
    """Refuse a missing or unknown command, naming the closest one."""
    names = list(commands())
    if not args:
        raise MMLearnError(f"expected a command: one of {', '.join(names)} (mmlearn --help)")
    first = args[0]
    if first.startswith("-") or first in names:
        return
    close = difflib.get_close_matches(first, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise MMLearnError(f"unknown command {first!r}; {hint}commands: {', '.join(names)}")


# ---- config files ------------------------------------------------------------------------------


def config_values(args: Sequence[str]) -> Iterator[str]:
    """The values of every ``--config``/``-c`` in ``args``."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            yield args[i + 1]
        elif arg.startswith("--config="):
            yield arg.partition("=")[2]


def check_config_files(args: Sequence[str]) -> None:
    """Refuse a ``--config`` that is a folder, not YAML, not a mapping, or no file at all.

    jsonargparse also takes a config given inline (``--config '{trainer: {max_epochs: 3}}'``):
    a value that is no file but parses as a YAML mapping is left to it.
    """
    for value in config_values(args):
        path = Path(value)
        where = f"--config {value}"
        if path.is_dir():
            raise MMLearnError(f"{where}: is a directory; expected a YAML config file")
        if not path.exists():
            try:
                inline = yaml.safe_load(value)
            except yaml.YAMLError:
                inline = None
            if isinstance(inline, Mapping):
                continue
            raise MMLearnError(f"{where}: file does not exist (relative to {os.getcwd()})")
        try:
            content = yaml.safe_load(path.read_text())
        except UnicodeDecodeError as e:
            raise MMLearnError(f"{where}: not a YAML text file ({e.reason})") from e
        except yaml.YAMLError as e:
            raise MMLearnError(f"{where}: not valid YAML: {_yaml_problem(e)}") from e
        if content is not None and not isinstance(content, Mapping):
            raise MMLearnError(
                f"{where}: expected a YAML mapping of options (model:, data:, trainer: ...), "
                f"got a {type(content).__name__}"
            )


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


# ---- one line for every user error -------------------------------------------------------------


def explain(exc: BaseException, args: Sequence[str] = ()) -> str | None:
    """The one-line message of a user error ``exc``, or ``None`` (a bug: keep the traceback).

    ``args`` (the command line) names the config files an unknown key may have come from.

    In this order: the outermost :class:`~mmlearn.errors.MMLearnError` of the cause chain (the
    constructors' checks); an option jsonargparse refused (:func:`argument_message`); an
    accelerator, device count, strategy or precision Lightning refused
    (:func:`trainer_message`); a path that cannot be read or written (:func:`path_message`).
    """
    err = user_error(exc)
    if isinstance(err, MMLearnError):
        return _one_line(str(err))
    for e in chain(exc):
        if isinstance(e, argparse.ArgumentError):
            return _one_line(argument_message(e, args))
    message = trainer_message(exc)
    if message is not None:
        return _one_line(message)
    if err is not None:
        return _one_line(path_message(err, exc))
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _frames(exc: BaseException) -> Iterator[FrameType]:
    for e in chain(exc):
        tb = e.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next


def _cli(exc: BaseException) -> LightningCLI | None:
    """The LightningCLI that ``exc`` went through (its parser and parsed config)."""
    for frame in _frames(exc):
        obj = frame.f_locals.get("self")
        if isinstance(obj, LightningCLI):
            return obj
    return None


def _config(cli: LightningCLI | None) -> Any:
    if cli is None or getattr(cli, "config", None) is None:
        return None
    sub = getattr(cli, "subcommand", None)
    return cli.config.get(sub) if sub else cli.config


# ---- jsonargparse's errors: the key, the value, what was expected, the closest valid name ------

_KEY = re.compile(r'^Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"class_path[ =]'([\w.]+)'")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_GIVEN = re.compile(r"(?:Given|Got) value: (.*?)(?:\n|$)")
_CLASS = re.compile(r"<class '([^']+)'>")
_UNKNOWN_KEY = re.compile(r"does not accept option '([^']+)'|Key '([^']+)' is not expected")


def argument_message(e: argparse.ArgumentError, args: Sequence[str] = ()) -> str:
    """One line for an error of the parser: an unknown option, a value of the wrong type."""
    errors = list(chain(e))
    messages = [str(x) for x in errors]
    leaf = messages[-1]
    if leaf.startswith("unrecognized arguments:"):
        return _unrecognized(leaf, e)
    in_file = _UNKNOWN_KEY.search(leaf)
    if in_file is not None:
        return _unknown_key(in_file[1] or in_file[2], e, args)
    keys: list[str] = []
    for m in messages:
        found = _KEY.match(m)
        if found and (not keys or keys[-1] != found[1]):
            keys.append(found[1])
    key = ".init_args.".join(keys)
    if keys == ["config"]:
        return f"--config: {_after_key(leaf)}"
    unknown = next((_NOT_ACCEPTED.match(m) for m in messages if _NOT_ACCEPTED.match(m)), None)
    if unknown is not None:
        return _unknown_option(key, unknown[1], messages)
    if not key:
        return leaf
    return f"{key}={_given(messages)}: expected {_expected(messages)}"


def _after_key(text: str) -> str:
    return _KEY.sub("", text).lstrip(": ") or text


def _given(messages: Sequence[str]) -> str:
    for m in reversed(messages):
        found = _GIVEN.search(m)
        if found:
            value = found[1].strip()
            return repr(value) if not value.startswith(("Namespace(", "NestedArg(")) else value
    return "?"


def _type_name(name: str) -> str:
    return {"NoneType": "null"}.get(name, name.removeprefix("builtins."))


def _expected(messages: Sequence[str]) -> str:
    """What the innermost type of the failing key accepts (its Union's subtypes)."""
    last_key = max((i for i, m in enumerate(messages) if _KEY.match(m)), default=0)
    subtypes = next((m for m in reversed(messages[last_key:]) if "Subtypes: [" in m), None)
    if subtypes is not None:
        line = subtypes[subtypes.index("Subtypes: [") + len("Subtypes: [") :].splitlines()[0]
        names = [_type_text(t) for t in _split_top(line.removesuffix("]"))]
        known = [k for n in names if (k := _subclass_names(n))]
        text = " or ".join(names)
        if known:
            text += f" (a class name or class_path: {', '.join(sorted(set(known[0])))})"
        return text
    found = re.search(r"Expected an? (.+?)(?:\. Got value:|$)", messages[-1])
    if found:
        return _type_text(found[1])
    return _one_line(messages[-1])


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"A[x, y], B"`` -> ``["A[x, y]", "B"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _type_text(text: str) -> str:
    """A type as jsonargparse prints it, as a user reads it (``<class 'NoneType'>`` -> null)."""
    text = _CLASS.sub(lambda m: _type_name(m[1]), text)
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text)
    if literal:
        return f"one of [{literal[1]}]"
    return text.replace("typing.", "").replace("collections.abc.", "")


def _subclass_names(class_path: str) -> list[str]:
    """Short names of the subclasses of an mmlearn class type (``Rule``: MGDA, Sum, ...)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    if not isinstance(cls, type) or not cls.__module__.startswith("mmlearn."):
        return []  # the project's class types (Rule, Moments) have short names worth listing
    found: list[str] = []
    todo: list[type] = list(cls.__subclasses__())
    while todo:
        sub = todo.pop()
        todo += sub.__subclasses__()
        if not sub.__name__.startswith("_"):
            found.append(sub.__name__)
    return found


def _class_options(class_path: str) -> list[str]:
    """The option names jsonargparse accepts for ``class_path`` (its signature, resolved)."""
    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "x")
    except Exception:  # an option list is a hint: without it, the message still names the key
        return []
    dests = [a.dest[2:] for a in parser._actions if a.dest.startswith("x.")]
    return [d for d in dests if not d.endswith(".help")]


def _unknown_option(key: str, option: str, messages: Sequence[str]) -> str:
    paths = [p for m in messages for p in _CLASS_PATH.findall(m)]
    owner = paths[-1] if paths else None
    bad = f"{key}.init_args.{option}" if key else option
    valid = _class_options(owner) if owner else []
    close = difflib.get_close_matches(option, valid, n=1, cutoff=0.6)
    where = f" of {owner}" if owner else ""
    if close:
        fix = f"{key}.init_args.{close[0]}" if key else close[0]
        return f"{bad}: unknown option{where}; did you mean {fix}?"
    hint = f"; its options: {', '.join(valid)}" if valid else ""
    return f"{bad}: unknown option{where}{hint}"


def _unrecognized(leaf: str, e: argparse.ArgumentError) -> str:
    tokens = leaf.partition(":")[2].split()
    options = [t.partition("=")[0] for t in tokens if t.startswith("-")]
    if not options:
        return f"unexpected argument(s) {' '.join(tokens)!r}: options are --key value"
    bad = options[0]
    known = _known_options(e)
    close = difflib.get_close_matches(bad, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "`mmlearn <command> --help` lists the options"
    return f"unknown option {bad}; {hint}"


def _unknown_key(key: str, e: BaseException, args: Sequence[str]) -> str:
    """A key of a config file that no option has: the closest one, and the files it may be in."""
    known = [o.removeprefix("--") for o in _known_options(e)]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    files = list(config_values(args))
    where = f" (in {', '.join(files)})" if files else ""
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{key}: unknown option{where}{hint}"


def _known_options(e: BaseException) -> list[str]:
    cli = _cli(e)
    parsers: list[Any] = []
    if cli is not None:
        parsers = list(getattr(cli, "_subcommand_parsers", {}).values()) or [cli.parser]
    known: list[str] = []
    for parser in parsers:
        for action in parser._actions:
            known += [o for o in action.option_strings if o.startswith("--")]
    return sorted(set(known))


# ---- the Trainer's machine options --------------------------------------------------------------

_TRAINER_KEYS = (
    ("accelerator", r"accelerator|backend"),
    ("devices", r"devices"),
    ("strategy", r"strategy"),
    ("precision", r"[Pp]recision"),
    ("num_nodes", r"num_nodes"),
)


def trainer_message(exc: BaseException) -> str | None:
    """One line for an accelerator/devices/strategy/precision the Trainer's connector refused."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    refused = next(
        (
            e
            for e in chain(exc)
            if isinstance(e, (MisconfigurationException, ValueError, TypeError, ImportError))
            and _raised_in(e, "accelerator_connector.py")
        ),
        None,
    )
    if refused is None:
        return None
    text = _one_line(str(refused))
    named = re.search(r"Trainer\((\w+)=|`(\w+)=", text)  # `Trainer(devices=0)`, `strategy='x'`
    if named is not None:
        key: str | None = named[1] or named[2]
    else:
        key = next((k for k, pattern in _TRAINER_KEYS if re.search(pattern, text)), None)
    cfg = _config(_cli(exc))
    trainer = cfg.get("trainer") if cfg is not None else None
    available = _available_accelerators()
    if key is None:
        return f"trainer: {text}; accelerators available here: {available} (or 'auto')"
    value = trainer.get(key) if trainer is not None else "?"
    if key == "accelerator":
        reason = text.split(". ")[0].rstrip(".!")
        return (
            f"trainer.{key}={value!r} cannot run on this machine ({reason}); available "
            f"accelerators: {available} (or 'auto')"
        )
    return f"trainer.{key}={value!r}: {text}"


def _raised_in(exc: BaseException, filename: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(filename):
            return True
        tb = tb.tb_next
    return False


def _available_accelerators() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    found = []
    for name in sorted(AcceleratorRegistry.available_accelerators()):
        try:
            if AcceleratorRegistry[name]["accelerator"].is_available():
                found.append(name)
        except Exception:  # an accelerator whose check itself fails is not available
            continue
    return found


# ---- output folders ---------------------------------------------------------------------------


def path_message(err: BaseException, exc: BaseException) -> str:
    """One line for a file-system error; for the run folder, the option that chose it."""
    if not isinstance(err, OSError) or err.filename is None:
        return str(err)
    path = str(err.filename)
    reason = err.strerror or type(err).__name__
    if isinstance(err, FileExistsError) and Path(path).is_file():
        reason += " (a file, not a folder)"
    cfg = _config(_cli(exc))
    if cfg is not None:
        trainer = cfg.get("trainer")
        for key, root in (
            ("run_dir", cfg.get("run_dir")),
            ("trainer.default_root_dir", trainer.get("default_root_dir") if trainer else None),
        ):
            if root and _related(path, str(root)):
                return f"cannot write the run folder {path!r}: {reason} (from {key}={root!r})"
    return f"{reason}: {path!r}"


def _related(path: str, root: str) -> bool:
    """``path`` is ``root``, inside it, or one of the folders above it."""
    a, b = os.path.abspath(path), os.path.abspath(root)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


# ---- the entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``mmlearn`` console script.

    User errors end the program with one ``mmlearn: error:`` line and exit status 2
    (:func:`explain`); anything else keeps its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    if args[:1] in (["-h"], ["--help"]):
        print(overview())
        sys.exit(0)
    try:
        _check_command(args)
        if args[0] in PROJECT_COMMANDS:
            sys.exit(PROJECT_COMMANDS[args[0]](args[1:]))
        check_config_files(args)
        check_choices(args)
        build_cli(None if argv is None else args)
        step.shutdown()
    except Exception as exc:
        message = explain(exc, args)
        if message is None:
            raise
        print(f"mmlearn: error: {message}", file=sys.stderr)
        sys.exit(2)
