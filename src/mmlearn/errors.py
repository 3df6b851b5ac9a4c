"""The exception for user errors: bad configuration or bad data.

Its message names the bad value, what was expected and where it came from (file, key, sample).
The CLI prints it as one line instead of a traceback, however deep in the instantiation it was
raised.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator

#: file-system errors a user fixes (a path that is missing, not a folder, or not writable); they
#: name their path, and the CLI prints them as one line too
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)


class MMLearnError(ValueError):
    """A configuration or data error a user can fix."""


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (or contexts), outermost first, each once."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_int(value: object, minimum: int) -> bool:
    """``value`` is an integer (not a bool) ``>= minimum``: a size, a count, a rank."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= minimum  # type: ignore[arg-type]
    except TypeError:
        return False


def is_probability(value: object) -> bool:
    """``value`` is a number in ``[0, 1)``: a dropout probability (1 would drop everything)."""
    if isinstance(value, (bool, str, bytes)):
        return False
    try:
        p = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return not math.isnan(p) and 0 <= p < 1


def user_error(exc: BaseException) -> BaseException | None:
    """The user error that ``exc`` reports, or ``None`` (a bug: keep its traceback).

    The outermost :class:`MMLearnError` in the cause chain: an error re-raised with more context
    (``raise MMLearnError(f"model.encoders.m0: {e}") from e``) is the one to print. Without one,
    the outermost file-system error about a path (:data:`PATH_ERRORS`).
    """
    errors = list(chain(exc))
    found = next((e for e in errors if isinstance(e, MMLearnError)), None)
    if found is not None:
        return found
    return next((e for e in errors if isinstance(e, PATH_ERRORS) and _names_a_path(e)), None)


def _names_a_path(exc: BaseException) -> bool:
    """An ``OSError`` from the system (with its file name), or one raised with a message."""
    return not isinstance(exc, OSError) or exc.filename is not None or bool(exc.args)
