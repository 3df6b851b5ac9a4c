"""Where data lives: the data root, and the one rule for paths given in a config.

The data root is a DataModule's ``root`` when given, else ``$MMLEARN_DATA``, else ``./data``
(relative to the working directory): :func:`default_root` is the only place that decides it.

Paths in a config follow one rule: a relative path is read relative to the file that contains it,
as jsonargparse already does for ``data: ../../data_modules/mfeat.yaml``; a value given on the
command line is read relative to the working directory. A DataModule argument annotated
:class:`ConfigPath` gets this rule from the CLI; from Python it takes a plain ``str`` or
``os.PathLike`` (relative to the working directory, as usual).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeAlias

from jsonargparse.typing import register_type

#: the environment variable naming the data root
ENV = "MMLEARN_DATA"


def default_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``root`` if given, else ``$MMLEARN_DATA`` if set (and not empty), else
    ``./data``.

    Args:
        root: a DataModule's or ``mmlearn prepare``'s explicit root, or ``None``.

    Returns:
        The root as a :class:`~pathlib.Path` (relative paths stay relative to the working
        directory).
    """
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV) or "data")


class ConfigPath(str):
    """A file or directory path that a config names: relative to that config file.

    Only an annotation for the CLI: jsonargparse changes into a config file's folder while it
    parses that file's values, so :func:`resolve_config_path` makes a relative value absolute
    against the file that contains it, and a command-line value against the working directory.
    The resolved, absolute path is what the run's saved ``config.yaml`` records, so that file reads
    the same from anywhere.
    """


def resolve_config_path(value: str | os.PathLike[str]) -> ConfigPath:
    """``value`` made absolute against the current directory (while parsing a config file: its
    folder), ``~`` expanded.

    Args:
        value: the path as written.

    Returns:
        The absolute path.

    Raises:
        ValueError: ``value`` is empty.
    """
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a path, got {value!r}")
    return ConfigPath(os.path.abspath(os.path.expanduser(text)))


register_type(ConfigPath, serializer=str, deserializer=resolve_config_path)

#: the annotation of a DataModule's path argument: the CLI reads it as a :class:`ConfigPath`
#: (tried first: jsonargparse tries ``str``, which takes anything, last), Python passes any path
PathArg: TypeAlias = ConfigPath | str | os.PathLike[str]
