"""What a `saewb` user sees when a command fails: one line naming the problem and the way on.

`saewb.cli.main` sends every exception here (unless `--debug` is given, which shows the traceback).
Operating-system failures (a full disk, a permission, a read-only file system), whether they reach
us as an `OSError` or inside a DuckDB error, get a line that says what happened, that the data
written so far is intact (every workspace write is one transaction, every checkpoint is written
aside and renamed into place), and how to continue. Our own errors (ValueError, FileNotFoundError,
RuntimeError and their subclasses) already carry the problem and the fix. Anything else is a bug or
a surprise: its type and first line, and a hint to rerun with --debug.
"""

from __future__ import annotations

import errno

INTACT = "the data written so far is intact"

_OS_FAILURES: tuple[tuple[tuple[int, ...], tuple[str, ...], str, str], ...] = (
    (
        (errno.ENOSPC, errno.EDQUOT),
        ("no space left on device", "disk quota exceeded"),
        "no space left on the device",
        "free some space (or move the workspace) and run the same command again to resume",
    ),
    (
        (errno.EROFS,),
        ("read-only file system",),
        "the file system is read-only",
        "remount it read-write or copy the workspace somewhere writable, then run the same command again",
    ),
    (
        (errno.EACCES, errno.EPERM),
        ("permission denied", "operation not permitted"),
        "permission denied",
        "fix the permissions (or use a workspace you own), then run the same command again",
    ),
)


def os_failure(err: BaseException) -> tuple[str, str] | None:
    """(what happened, how to continue) when `err` is a full disk, a read-only file system or a
    permission problem, as an OSError or as a DuckDB error that carries the OS's message."""
    code = err.errno if isinstance(err, OSError) else None
    text = str(err).lower()
    for codes, phrases, what, fix in _OS_FAILURES:
        if code in codes or any(p in text for p in phrases):
            return what, fix
    return None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _where(err: BaseException) -> str:
    name = getattr(err, "filename", None)
    return f" ({name})" if name else ""


class UsageError(ValueError):
    """A bad argument to the Python API (``saewb.api``): its message is the line `saewb` prints for
    the same input (``describe`` of the original error, which is its ``__cause__``)."""

    @classmethod
    def of(cls, err: BaseException) -> UsageError:
        """The API's error for ``err``: a ``MissingInputError`` for a missing file, else a ``UsageError``."""
        kind = MissingInputError if isinstance(err, FileNotFoundError) else cls
        return kind(describe(err))


class MissingInputError(UsageError, FileNotFoundError):
    """A missing workspace, run folder or input file, as the Python API reports it."""


def describe(err: BaseException) -> str:
    """The one line a user sees for `err`."""
    failure = os_failure(err)
    if failure is not None:
        what, fix = failure
        return f"{what}{_where(err)}; {INTACT}: {fix} (details: {_first_line(str(err))})"
    if isinstance(err, ValueError | FileNotFoundError | RuntimeError):
        return " ".join(str(err).split()) or type(err).__name__  # our messages: the problem and the fix
    if isinstance(err, OSError):
        return f"{_first_line(str(err))}{_where(err)}; {INTACT}: fix the cause and run the same command again"
    return f"unexpected {type(err).__name__}: {_first_line(str(err))} (rerun with --debug for the traceback)"
