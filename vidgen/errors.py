"""What a user got wrong, and the one handler that turns it into one line.

Every error that names a setting or an input file and says what was expected derives from `UserError`
(a bad override, a missing shard folder, a checkpoint of the wrong kind, a corrupt file, ...). The entry
points (`train.py`, `sample.py`, `data_prep/*.py`, `python -m vidgen...`) run under `one_line_errors`: such an
error prints `error: <message>` on stderr and exits 2, with no traceback. `VIDGEN_DEBUG=1`,
`HYDRA_FULL_ERROR=1` or `--debug` on the command line shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A setting or input that cannot work; the message names it and what was expected (one line)."""


# File-system errors a user causes by a wrong path; their messages name the path.
_USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def debug_requested() -> bool:
    """Whether the user asked for full tracebacks."""
    return (os.environ.get("VIDGEN_DEBUG", "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR", "") == "1"
            or "--debug" in sys.argv)


def user_error_line(exc: BaseException) -> str | None:
    """The one line for a user error (following `raise ... from`/context chains), or None for a bug."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (UserError, *_USER_OS_ERRORS)):
            text = " ".join(str(exc).split()) or type(exc).__name__
            return f"error: {text}"
        exc = exc.__cause__ or exc.__context__
    return None


def one_line_errors(fn: F) -> F:
    """Decorate an entry point: a `UserError` (or a wrong path) becomes one stderr line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "--debug" in sys.argv:
            sys.argv.remove("--debug")
            os.environ["VIDGEN_DEBUG"] = "1"
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (re-raised unless it is a user error)
            line = user_error_line(e)
            if line is None or debug_requested():
                raise
            print(line, file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
