"""The one exception type for mistakes a user can fix (bad option, bad file, wrong checkpoint).

The CLIs turn it into a single line on stderr and exit code 2 (``user_errors``); a run
stopped by a preemption signal (``Resumable``) is one ``stopped: ...`` line and exit code 75;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from functools import wraps
from typing import Any, Callable


class HgkdError(Exception):
    """A user-facing error: the message names the file/option and says what to do."""


RESUMABLE_EXIT = 75  # EX_TEMPFAIL: stopped early on purpose; the same command continues the run


class Resumable(Exception):
    """A run stopped at a step boundary (preemption signal) after writing its checkpoint; the
    message says where it stopped and that re-running the same command continues it."""


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """CLI decorator: HgkdError -> ``error: <message>`` on stderr, exit code 2, no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HgkdError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(2)
        except Resumable as stop:
            print(f"stopped: {stop}", file=sys.stderr)
            sys.exit(RESUMABLE_EXIT)

    return wrapper


def one_line(err: HgkdError) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch re-raises it in the
    main process as ``Caught <Type> in DataLoader worker process N.\nOriginal Traceback ...``,
    whose last line is ``<module>.<Type>: <message>``."""
    text = str(err)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    last = text.rstrip().splitlines()[-1]
    for cls in type(err).__mro__:
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        if last.startswith(prefix):
            return last[len(prefix):]
    return last.split(": ", 1)[-1]
