"""The workspace: one DuckDB file shared by harvests, training runs, analysis and the app.

DuckDB lets one read-write connection lock the file against every other process, and a writer
locks out read-only opens. So no process ever holds a connection for long:

* writers open, write one bounded transaction (one chunk of a harvest, one batch of metrics),
  commit and close;
* readers open read-only, run their queries, and close;
* both retry with backoff while another process holds the lock;
* a process that had to wait says so in a waiting room (a shared `flock` on a sidecar file), and
  a process about to open lets those already waiting go first.

Every hold is short (well under a second for the chunk sizes used here). Without the waiting room a
harvest whose writer thread commits back to back re-opens the file the instant it closes it, and a
polling reader can miss every gap for the whole job. With it a reader waits at most about one writer
transaction and a writer at most one read, so neither blocks the other for the length of a job.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb

LOCK_TIMEOUT_S = 60.0
"""How long an open waits for another process's lock before giving up."""

YIELD_S = 1.0
"""The longest an open stands aside for processes already in the waiting room."""

WAITING_POLL_S = 0.02
"""The longest a waiting process sleeps between tries, so a writer standing aside is soon free."""

TORN_READ_ATTEMPTS = 3
"""How many times ``Workspace.read_consistent`` runs a read that DuckDB found the file short for."""

T = TypeVar("T")

try:
    import fcntl
except ImportError:  # Windows: no waiting room, plain retries
    fcntl = None  # type: ignore[assignment]


class _WaitingRoom:
    """Who is waiting for the workspace: each waiter holds a shared flock on a sidecar file.

    The kernel drops a dead process's flock, so a killed waiter never leaves a stale entry.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.parent / f".{db_path.name}.waiting"

    def _fd(self) -> int | None:
        if fcntl is None:
            return None
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # a read-only directory still works if it exists
            try:
                return os.open(self.path, flags, 0o666)
            except OSError:
                continue
        return None

    def occupied(self) -> bool:
        fd = self._fd()
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock too
        return False

    def enter(self) -> int | None:
        fd = self._fd()
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    @staticmethod
    def leave(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)


class WorkspaceBusyError(RuntimeError):
    """Another process held the workspace lock for longer than the timeout."""


class WorkspaceNotFoundError(FileNotFoundError):
    """The workspace file does not exist."""


class NotAWorkspaceError(ValueError):
    """The path holds a file that is not a DuckDB database (it is left untouched)."""


def dict_rows(
    con: duckdb.DuckDBPyConnection, query: str, params: list[Any] | None = None
) -> list[dict[str, Any]]:
    """The rows of a query as dicts keyed by column name, in the query's order."""
    cur = con.execute(query, params or [])
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _is_lock_conflict(err: duckdb.Error) -> bool:
    text = str(err).lower()
    return "lock" in text or "conflicting" in text or "being used by another process" in text


class Workspace:
    """A handle on a workspace file; it holds no connection between uses."""

    def __init__(self, path: str | Path, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r})"

    @property
    def runs_dir(self) -> Path:
        """Where checkpoints of this workspace's training runs live (beside the file)."""
        return self.path.with_suffix(".runs")

    def exists(self) -> bool:
        return self.path.exists()

    def _open(self, read_only: bool, config: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
        if read_only and not self.path.exists():
            raise WorkspaceNotFoundError(
                f"workspace {self.path} does not exist; create it with `saewb harvest --workspace {self.path} ...`"
            )
        room = _WaitingRoom(self.path)
        stand_aside_until = time.monotonic() + YIELD_S
        while room.occupied() and time.monotonic() < stand_aside_until:
            time.sleep(0.002)
        deadline = time.monotonic() + self.lock_timeout_s
        delay, waiting = 0.005, None
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only, config=config or {})
                room.leave(waiting)
                return con
            except duckdb.Error as err:  # IOException / ConnectionException on lock conflicts
                if waiting is None and _is_lock_conflict(err):
                    waiting = room.enter()
                if not _is_lock_conflict(err) or time.monotonic() > deadline:
                    room.leave(waiting)
                    if "not a valid duckdb database file" in str(err).lower():
                        raise NotAWorkspaceError(
                            f"{self.path} is not a DuckDB workspace (it holds another kind of file, left untouched); "
                            "point --workspace at a .duckdb file made by `saewb harvest`, or at a new path"
                        ) from err
                    if _is_lock_conflict(err):
                        raise WorkspaceBusyError(
                            f"workspace {self.path} stayed locked by another process for "
                            f"{self.lock_timeout_s:.0f}s; a process is holding a connection open "
                            "(see saewb/workspace.py for the sharing rules)"
                        ) from err
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, WAITING_POLL_S)

    @contextmanager
    def read(self, memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-only connection. Do not keep it beyond a few queries.

        `memory_limit` caps DuckDB's buffer pool for scans whose pages need not stay cached.
        """
        con = self._open(read_only=True, config={"memory_limit": memory_limit} if memory_limit else None)
        try:
            yield con
        finally:
            con.close()

    def read_consistent(
        self, query: Callable[[duckdb.DuckDBPyConnection], T], memory_limit: str | None = None
    ) -> T:
        """``query(con)`` in a short read-only connection, run again in a fresh one (up to
        TORN_READ_ATTEMPTS times) when DuckDB reports a short read of the file. Seen once in ~40 CI runs:
        a reader polling while a harvest committed back to back died with "Could not read enough
        bytes" mid-query; the next open sees the committed file whole. ``query`` must only read."""
        for attempt in range(TORN_READ_ATTEMPTS):
            try:
                with self.read(memory_limit=memory_limit) as con:
                    return query(con)
            except duckdb.IOException as err:
                if "could not read enough bytes" not in str(err).lower() or attempt == TORN_READ_ATTEMPTS - 1:
                    raise
                time.sleep(WAITING_POLL_S)
        raise AssertionError("unreachable")

    @contextmanager
    def write(self, threads: int | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-write connection inside one transaction.

        Commits on success and rolls back on any exception, so a killed or failing writer leaves
        the data exactly as the last committed transaction left it. `threads` caps DuckDB's own
        threads (a writer that runs beside other busy threads of its process).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open(read_only=False, config={"threads": str(threads)} if threads else None)
        try:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()
        finally:
            con.close()

    def table_exists(self, name: str) -> bool:
        if not self.path.exists():
            return False
        with self.read() as con:
            rows = con.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_name = ?", [name]
            ).fetchall()
        return bool(rows)


def existing_workspace(path: str | Path | Workspace) -> Workspace:
    """The workspace at ``path`` for a command that reads one; WorkspaceNotFoundError naming the fix when
    there is none (a reader must not create an empty file at a mistyped path)."""
    ws = path if isinstance(path, Workspace) else Workspace(path)
    if not ws.exists():
        raise WorkspaceNotFoundError(f"workspace {ws.path} does not exist; check --workspace")
    return ws
