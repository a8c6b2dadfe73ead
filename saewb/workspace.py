"""The workspace: one DuckDB file shared by harvests, training runs, analysis and the app.

DuckDB lets one read-write connection lock the file against every other process, and a writer
locks out read-only opens. So no process ever holds a connection for long:

* writers open, write one bounded transaction (one chunk of a harvest, one batch of metrics),
  commit and close;
* readers open read-only, run their queries, and close;
* both retry with backoff while another process holds the lock.

Every hold is short (well under a second for the chunk sizes used here), so a reader waits at
most one writer transaction and a writer at most one read. Neither ever blocks the other for
the length of a job.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

LOCK_TIMEOUT_S = 60.0
"""How long an open waits for another process's lock before giving up."""


class WorkspaceBusyError(RuntimeError):
    """Another process held the workspace lock for longer than the timeout."""


class WorkspaceNotFoundError(FileNotFoundError):
    """The workspace file does not exist."""


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
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.005
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only, config=config or {})
            except duckdb.Error as err:  # IOException / ConnectionException on lock conflicts
                if not _is_lock_conflict(err) or time.monotonic() > deadline:
                    if _is_lock_conflict(err):
                        raise WorkspaceBusyError(
                            f"workspace {self.path} stayed locked by another process for "
                            f"{self.lock_timeout_s:.0f}s; a process is holding a connection open "
                            "(see saewb/workspace.py for the sharing rules)"
                        ) from err
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.2)

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

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-write connection inside one transaction.

        Commits on success and rolls back on any exception, so a killed or failing writer leaves
        the data exactly as the last committed transaction left it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open(read_only=False)
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
