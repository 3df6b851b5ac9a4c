"""The exception for user errors: bad configuration or bad data.

Its message names the bad value, what was expected and where it came from (file, key, sample).
The CLI prints it as one line instead of a traceback, however deep in the instantiation it was
raised.
"""

from __future__ import annotations


class MMLearnError(ValueError):
    """A configuration or data error a user can fix."""


def user_error(exc: BaseException) -> BaseException | None:
    """The innermost :class:`MMLearnError` or ``FileNotFoundError`` in ``exc``'s cause chain."""
    found = None
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (MMLearnError, FileNotFoundError)):
            found = cur
        cur = cur.__cause__ or cur.__context__
    return found
