"""Training runs in the workspace: the ``runs`` and ``metrics`` tables.

Every access is one short transaction through ``Workspace.read()`` / ``Workspace.write()`` (no
connection outlives a few statements), so the app or a harvest can open the file between writes.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

from saewb.workspace import Workspace, dict_rows

METRIC_COLUMNS = ("step", "tokens", "loss", "fvu", "l0", "dead_frac", "dense_frac", "lr", "tokens_per_s")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs (
        name VARCHAR PRIMARY KEY,
        harvest VARCHAR,
        hook VARCHAR,
        arch VARCHAR,
        config VARCHAR,
        checkpoint_path VARCHAR,
        status VARCHAR,
        created_at TIMESTAMP,
        updated_at TIMESTAMP,
        final_metrics VARCHAR
    )""",
    # why a run failed (a diverged run's reason starts with DIVERGED); added after the first release
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS reason VARCHAR",
    """CREATE TABLE IF NOT EXISTS metrics (
        run VARCHAR, step BIGINT, tokens BIGINT, loss DOUBLE, fvu DOUBLE, l0 DOUBLE,
        dead_frac DOUBLE, dense_frac DOUBLE, lr DOUBLE, tokens_per_s DOUBLE
    )""",
]


DIVERGED = "diverged"
"""How the reason of a run stopped by the trainers' divergence guard begins (sae/trainer.py)."""


def without_lr(record: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config minus its learning rate."""
    train = {k: v for k, v in (record.get("train") or {}).items() if k != "lr"}
    return {**record, "train": train}


def may_resume(stored: dict[str, Any], new: dict[str, Any], diverged: bool) -> bool:
    """Whether a run stored with `stored` may go on with `new`: the same config, or, once it has
    diverged, the same config but for the learning rate (resume from the last good checkpoint with
    a lower --lr)."""
    return stored == new or (diverged and without_lr(stored) == without_lr(new))


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def ensure_tables(ws: Workspace) -> None:
    with ws.write() as con:
        for stmt in _SCHEMA:
            con.execute(stmt)


def is_diverged(row: dict[str, Any] | None) -> bool:
    """Whether a `get_run` row is a run the divergence guard stopped (it may resume with another lr)."""
    return row is not None and row["status"] == "failed" and str(row.get("reason") or "").startswith(DIVERGED)


def get_run(ws: Workspace, name: str) -> dict[str, Any] | None:
    if not ws.table_exists("runs"):
        return None
    with ws.read() as con:
        rows = dict_rows(con, "SELECT * FROM runs WHERE name = ?", [name])
    if not rows:
        return None
    out = rows[0]
    out["config"] = json.loads(out["config"]) if out["config"] else None
    out["final_metrics"] = json.loads(out["final_metrics"]) if out["final_metrics"] else None
    return out


def start_run(
    ws: Workspace,
    name: str,
    *,
    harvest: str | None,
    hook: str | None,
    arch: str,
    config: dict[str, Any],
    checkpoint_path: str,
    resume_step: int = 0,
) -> None:
    """Register a new run, or mark an existing one (same config) running again.

    On resume, metric rows past the checkpoint being resumed are dropped: the resumed run logs them
    again, so the table never holds two rows for one step.
    """
    ensure_tables(ws)
    cfg_json = json.dumps(config, sort_keys=True)
    with ws.write() as con:
        row = con.execute("SELECT config, status, reason FROM runs WHERE name = ?", [name]).fetchone()
        if row is not None:
            from sae.lifecycle import refuse_different_config

            refuse_different_config(
                json.loads(row[0]),
                json.loads(cfg_json),
                is_diverged({"status": row[1], "reason": row[2]}),
                f"a run named {name!r} already exists",
            )
        now = _now()
        if row is None:
            con.execute(
                "INSERT INTO runs (name, harvest, hook, arch, config, checkpoint_path, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                [name, harvest, hook, arch, cfg_json, checkpoint_path, now, now],
            )
        else:
            con.execute(
                "UPDATE runs SET status = 'running', updated_at = ?, checkpoint_path = ?, config = ?, reason = NULL"
                " WHERE name = ?",
                [now, checkpoint_path, cfg_json, name],
            )
        con.execute("DELETE FROM metrics WHERE run = ? AND step > ?", [name, resume_step])


def log_metrics(ws: Workspace, name: str, rows: list[dict[str, float]]) -> None:
    if not rows:
        return
    values = [[name, *[row.get(c) for c in METRIC_COLUMNS]] for row in rows]
    with ws.write() as con:
        con.executemany(f"INSERT INTO metrics VALUES (?, {', '.join('?' for _ in METRIC_COLUMNS)})", values)
        con.execute("UPDATE runs SET updated_at = ? WHERE name = ?", [_now(), name])


def set_checkpoint(ws: Workspace, name: str, path: str) -> None:
    with ws.write() as con:
        con.execute(
            "UPDATE runs SET checkpoint_path = ?, updated_at = ? WHERE name = ?", [path, _now(), name]
        )


def finish_run(
    ws: Workspace,
    name: str,
    status: str,
    final_metrics: dict[str, Any] | None = None,
    path: str | None = None,
    reason: str | None = None,
) -> None:
    with ws.write() as con:
        con.execute(
            "UPDATE runs SET status = ?, updated_at = ?, final_metrics = COALESCE(?, final_metrics),"
            " checkpoint_path = COALESCE(?, checkpoint_path), reason = ? WHERE name = ?",
            [
                status,
                _now(),
                json.dumps(final_metrics) if final_metrics is not None else None,
                path,
                reason,
                name,
            ],
        )


def mark_stopped(
    ws: Workspace, names: list[str], err: BaseException, reasons: dict[str, str] | None = None
) -> None:
    """Record runs stopped by `err`: interrupted (Ctrl-C) or failed with the reason (`reasons` by run,
    else the error's message). Never raises: on a full or read-only disk the record may not be
    writable, and the error the user must see is `err`."""
    status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
    default = getattr(err, "reason", None) or " ".join(str(err).split()) or type(err).__name__
    with contextlib.suppress(Exception):
        for name in names:
            finish_run(
                ws,
                name,
                status,
                reason=None if status == "interrupted" else (reasons or {}).get(name, default),
            )


def list_runs(ws: Workspace) -> list[dict[str, Any]]:
    if not ws.table_exists("runs"):
        return []
    with ws.read() as con:
        rows = dict_rows(con, "SELECT * FROM runs ORDER BY created_at")
    out = []
    for d in rows:
        d.pop("config", None)
        d["final_metrics"] = json.loads(d["final_metrics"]) if d["final_metrics"] else {}
        d.setdefault("reason", None)  # workspaces from before the column
        out.append(d)
    return out


def run_metrics(ws: Workspace, name: str) -> list[dict[str, Any]]:
    if not ws.table_exists("metrics"):
        return []
    with ws.read() as con:
        cur = con.execute(
            f"SELECT {', '.join(METRIC_COLUMNS)} FROM metrics WHERE run = ? ORDER BY step", [name]
        )
        rows = cur.fetchall()
    return [dict(zip(METRIC_COLUMNS, r, strict=True)) for r in rows]


def latest_metrics(ws: Workspace) -> list[dict[str, Any]]:
    """The latest logged step of every run: run, arch, tokens, l0, fvu."""
    if not ws.table_exists("metrics"):
        return []
    with ws.read() as con:
        return dict_rows(
            con,
            "SELECT m.run, r.arch, m.tokens, m.l0, m.fvu FROM metrics m JOIN runs r ON r.name = m.run "
            "QUALIFY row_number() OVER (PARTITION BY m.run ORDER BY m.step DESC) = 1",
        )


def newest_done_run(ws: Workspace) -> str | None:
    """The most recently finished run, or None (no workspace, no finished run)."""
    if not ws.exists() or not ws.table_exists("runs"):
        return None
    with ws.read() as con:
        row = con.execute(
            "SELECT name FROM runs WHERE status = 'done' ORDER BY updated_at DESC NULLS LAST LIMIT 1"
        ).fetchone()
    return None if row is None else str(row[0])
