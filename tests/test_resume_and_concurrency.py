"""Real processes: a SIGKILLed harvest resumes exactly; readers and writers share a workspace."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from activations.harvest import HarvestConfig, run_harvest
from activations.store import harvest_info
from saewb.workspace import Workspace

HARVEST_ARGS = [
    "harvest",
    "--model",
    "minilm",
    "--corpus",
    "stdlib-docs",
    "--hook",
    "blocks.1.hook_out",
    "--ctx-len",
    "64",
    "--max-tokens",
    "8000",
    "--commit-tokens",
    "1500",
    "--batch-size",
    "8",
    "--quiet",
]


def _start(ws: Path, args: list[str] = HARVEST_ARGS) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "saewb.cli", *args, "--workspace", str(ws)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_once_committed(proc: subprocess.Popen[str], ws: Path, tokens: int, poll_s: float) -> int:
    """SIGKILL the harvest as soon as `ws` holds at least `tokens` committed ones; what it holds then."""
    deadline = time.monotonic() + 300
    while _committed(ws) < tokens:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(poll_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return _committed(ws)


def _committed(ws: Path) -> int:
    if not ws.exists():
        return 0
    w = Workspace(ws)
    if not w.table_exists("harvests"):
        return 0
    with w.read() as con:
        row = con.execute("SELECT n_tokens FROM harvests WHERE name = 'default'").fetchone()
    return row[0] if row else 0


def _dump(ws: Path) -> tuple[list[tuple], np.ndarray]:
    from activations.reader import read_activations

    con = duckdb.connect(str(ws), read_only=True)
    toks = con.execute(
        "SELECT tok_idx, doc_id, pos, seq_id, token_id, is_special FROM tokens ORDER BY tok_idx"
    ).fetchall()
    con.close()
    info = harvest_info(ws)
    idx, x = read_activations(Workspace(ws), info.tables["blocks.1.hook_out"], 0, info.n_tokens + 1)
    assert np.array_equal(idx, np.arange(info.n_tokens))
    return toks, x


def _shard_files_on_disk_are_the_listed_ones(ws: Path) -> None:
    """No orphan left by the kill: every shard file is listed, the listed ranges tile 0..n_tokens."""
    from activations.store import acts_dir

    with Workspace(ws).read() as con:
        rows = con.execute("SELECT start, stop, file FROM act_shards ORDER BY start").fetchall()
    assert sorted(
        str(p.relative_to(acts_dir(Workspace(ws)))) for p in acts_dir(Workspace(ws)).rglob("*") if p.is_file()
    ) == sorted(r[2] for r in rows)
    assert [r[0] for r in rows] == [0] + [r[1] for r in rows[:-1]] and rows[-1][1] == harvest_info(
        ws
    ).n_tokens


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    killed = tmp_path / "killed.duckdb"
    # a commit is in; kill mid-flight, five commits before the end
    partial = _kill_once_committed(_start(killed), killed, 1500, poll_s=0.2)
    assert 0 < partial < 8000
    # The same harvest (HARVEST_ARGS) in this process: resumed after the kill, and uninterrupted.
    cfg = HarvestConfig(
        model="minilm",
        corpus="stdlib-docs",
        hooks=("blocks.1.hook_out",),
        ctx_len=64,
        max_tokens=8000,
        commit_tokens=1500,
        batch_size=8,
    )
    run_harvest(cfg, killed, progress=False)
    clean = tmp_path / "clean.duckdb"
    run_harvest(cfg, clean, progress=False)

    toks_a, x_a = _dump(killed)
    toks_b, x_b = _dump(clean)
    assert toks_a == toks_b  # same tokens, same order: no duplicates, no gaps
    assert [t[0] for t in toks_a] == list(range(len(toks_a)))
    np.testing.assert_array_equal(x_a, x_b)
    assert harvest_info(killed).status == "complete"
    assert harvest_info(killed).n_docs == harvest_info(clean).n_docs
    _shard_files_on_disk_are_the_listed_ones(killed)


OLD_HOOK = "blocks.0.hook_out"
OLD_ARGS = ["--model", "tiny-lm", "--corpus", "stdlib-docs", "--hook", OLD_HOOK, "--ctx-len", "64"]
OLD_ARGS += ["--max-tokens", "1500", "--commit-tokens", "200", "--batch-size", "4", "--quiet"]


def _old_layout_harvest(ws: Path) -> None:
    """Register the harvest as the code before the shard files did (one `(tok_idx BIGINT, x FLOAT[d])`
    DuckDB table per hook, a float32 identity, no `layout` in the config), nothing committed yet: the
    real harvester then resumes it in its tables, as it resumes a harvest of an old workspace."""
    import json

    from activations.harvest import Harvester
    from activations.store import quote_ident

    Harvester(HarvestConfig(model="tiny-lm", hooks=(OLD_HOOK,), ctx_len=64, max_tokens=1500), ws)
    with Workspace(ws).write() as con:
        config = json.loads(con.execute("SELECT config FROM harvests").fetchone()[0])
        del config["layout"], config["acts_dir"]
        config["identity"]["dtype"] = "float32"
        con.execute("UPDATE harvests SET config = ?", [json.dumps(config)])
        for table, d in con.execute("SELECT table_name, d FROM harvest_hooks").fetchall():
            con.execute(f"CREATE TABLE {quote_ident(table)} (tok_idx BIGINT NOT NULL, x FLOAT[{int(d)}])")


def test_old_layout_harvest_resumes_in_its_table_after_sigkill(tmp_path: Path) -> None:
    from activations.reader import read_activations

    killed = tmp_path / "old.duckdb"
    _old_layout_harvest(killed)
    # the first commit is in: kill mid-flight, several commits before the end
    partial = _kill_once_committed(_start(killed, ["harvest", *OLD_ARGS]), killed, 1, poll_s=0.01)
    cfg = HarvestConfig(model="tiny-lm", hooks=(OLD_HOOK,), ctx_len=64, max_tokens=1500, batch_size=4)
    info = run_harvest(cfg, killed, progress=False)  # the rest in one commit
    assert 0 < partial < info.n_tokens, partial
    assert info.layout == "table" and info.status == "complete" and info.store_dtype == "float32"
    table = info.tables[OLD_HOOK]
    with Workspace(killed).read() as con:
        n, distinct, top = con.execute(
            f"SELECT count(*), count(DISTINCT tok_idx), max(tok_idx) FROM {table}"
        ).fetchone()
        assert con.execute("SELECT count(*) FROM act_shards").fetchone() == (0,)
    assert n == distinct == info.n_tokens and top == n - 1  # every token once: none lost, none twice
    assert not (killed.with_suffix(".acts")).exists()  # its activations never left the table

    clean = tmp_path / "clean.duckdb"  # uninterrupted, in the new layout: the same rows bit for bit
    run_harvest(dataclasses.replace(cfg, store_dtype="float32"), clean, progress=False)
    query = "SELECT tok_idx, doc_id, pos, token_id FROM tokens ORDER BY tok_idx"
    with Workspace(killed).read() as a, Workspace(clean).read() as b:
        assert a.execute(query).fetchall() == b.execute(query).fetchall()
    _, x_killed = read_activations(Workspace(killed), table, 0, n)
    _, x_clean = read_activations(Workspace(clean), harvest_info(clean).tables[OLD_HOOK], 0, n)
    np.testing.assert_array_equal(x_killed, x_clean)


READER = r"""
import sys, time, json
from saewb.workspace import Workspace
from activations.stream import ActivationStream
ws = Workspace(sys.argv[1])
seen, streamed, status, t_end = [], 0, None, time.monotonic() + float(sys.argv[2])
print("polling", flush=True)
while status != "complete" and time.monotonic() < t_end:  # read until the writer is done
    if ws.exists() and ws.table_exists("harvest_hooks"):
        with ws.read() as con:
            row = con.execute("SELECT n_tokens, status FROM harvests").fetchone()
        if row and row[0] > 0:
            seen.append(row[0])
            status = row[1]
            s = ActivationStream(ws, "blocks.1.hook_out", batch_size=256, split="all")
            streamed = max(streamed, sum(len(b) for b in s.epoch()))
    time.sleep(0.02)
print(json.dumps({"seen": seen, "streamed": streamed, "status": status}))
"""


def test_reader_and_writer_processes_never_block_each_other(tmp_path: Path) -> None:
    import json

    ws = tmp_path / "shared.duckdb"
    # The reader polls before the writer starts and until it finishes, and the writer makes many
    # small commits, so the reader sees several of them land however fast the machine is.
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(ws), "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None and reader.stdout.readline().strip() == "polling"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "saewb.cli",
            *HARVEST_ARGS,
            "--workspace",
            str(ws),
            "--max-tokens",
            "16000",
            "--commit-tokens",
            "500",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = reader.communicate(timeout=360)
    assert reader.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert writer.wait(timeout=600) == 0, writer.stderr.read() if writer.stderr else ""
    assert report["status"] == "complete"
    seen = report["seen"]
    assert len(seen) >= 5 and len(set(seen)) >= 2  # the reader kept reading and saw new commits land
    assert seen == sorted(seen)
    assert report["streamed"] > 0
    assert harvest_info(ws).n_tokens >= 8000  # the writer finished despite the reader


BACK_TO_BACK_WRITER = r"""
import sys, time, numpy as np, pyarrow as pa
from saewb.workspace import Workspace
ws = Workspace(sys.argv[1])
with ws.write() as con:
    con.execute("CREATE TABLE t (i BIGINT, x FLOAT[64])")
    con.execute("CREATE TABLE c (n BIGINT)")
    con.execute("INSERT INTO c VALUES (0)")
print("ready", flush=True)
sys.stdin.readline()
x = pa.FixedSizeListArray.from_arrays(pa.array(np.random.rand(500 * 64).astype(np.float32)), 64)
n, t_end = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < t_end:  # re-opens the instant it closes, like a harvest's writer thread
    with ws.write() as con:
        rows = pa.table({"i": np.arange(500) + 500 * n, "x": x})
        con.execute("INSERT INTO t SELECT * FROM rows")
        n += 1
        con.execute("UPDATE c SET n = ?", [n])
print(n, flush=True)
"""

POLLING_READER = r"""
import sys, time, json
from saewb.workspace import Workspace
ws = Workspace(sys.argv[1])

def poll(seconds):
    seen, t_end = [], time.monotonic() + seconds
    while time.monotonic() < t_end:
        with ws.read() as con:
            seen.append(con.execute("SELECT n FROM c").fetchone()[0])
        time.sleep(0.05)
    return seen

print(len(poll(1.5)), flush=True)  # alone: how often this machine lets it read
print(json.dumps(poll(4.0)))  # beside the writer
"""


def test_a_reader_gets_in_between_back_to_back_commits(tmp_path: Path) -> None:
    """A writer that re-opens as soon as it closes must not starve a polling reader."""
    import json

    ws = tmp_path / "busy.duckdb"
    writer = subprocess.Popen(
        [sys.executable, "-c", BACK_TO_BACK_WRITER, str(ws), "6"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdin is not None
    assert writer.stdout.readline().strip() == "ready", writer.stderr
    reader = subprocess.Popen(
        [sys.executable, "-c", POLLING_READER, str(ws)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None
    alone = int(reader.stdout.readline())
    writer.stdin.write("go\n")
    writer.stdin.flush()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    w_out, w_err = writer.communicate(timeout=120)
    assert writer.returncode == 0, w_err
    seen, commits = json.loads(out), int(w_out.strip())
    assert seen == sorted(seen)
    assert commits > 20 and seen[-1] - seen[0] > 10, (commits, seen)  # the writer was busy throughout
    # Beside the writer the reader keeps most of its pace (it waits about one commit per read).
    # Measured: 0.8 of its pace on an idle machine, 0.60-0.64 with a test of the other xdist worker
    # holding a core (three busy processes on two cores); starved, without the waiting room, 0.3.
    rate_alone, rate_beside = alone / 1.5, len(seen) / 4.0
    assert rate_beside >= 0.5 * rate_alone, (rate_alone, rate_beside, seen)


def test_a_read_that_finds_the_file_short_runs_again_in_a_fresh_connection(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "w.duckdb")
    with ws.write() as con:
        con.execute("CREATE TABLE t AS SELECT range AS i FROM range(10)")
    calls: list[int] = []

    def torn_once(con: duckdb.DuckDBPyConnection) -> int:
        calls.append(id(con))
        if len(calls) == 1:  # what DuckDB raised mid-query while a writer committed (CI, session 19)
            raise duckdb.IOException('IO Error: Could not read enough bytes from file "w.duckdb"')
        return con.execute("SELECT sum(i) FROM t").fetchall()[0][0]

    assert ws.read_consistent(torn_once) == 45 and len(calls) == 2

    def always_torn(con: duckdb.DuckDBPyConnection) -> None:
        raise duckdb.IOException("IO Error: Could not read enough bytes")

    def other_error(con: duckdb.DuckDBPyConnection) -> None:
        calls.append(0)
        raise duckdb.IOException("IO Error: No files found that match the pattern")

    with pytest.raises(duckdb.IOException, match="enough bytes"):  # gives up after a few tries
        ws.read_consistent(always_torn)
    calls.clear()
    with pytest.raises(duckdb.IOException, match="No files"):  # any other error is not retried
        ws.read_consistent(other_error)
    assert calls == [0]
