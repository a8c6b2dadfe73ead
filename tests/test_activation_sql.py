"""SQL over the activation shard files (activations/sql.py, `saewb.sql`): each hook's
`act__<harvest>__<hook>` view returns exactly the reader's float32 rows, joins with `tokens`, and
reads a shard file only when a query needs its rows."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from conftest import TINY_LM_HOOK as HOOK

import saewb
from activations.reader import read_activations
from activations.sql import activation_sql
from activations.store import acts_dir, commit_rows, encode, harvest_info, register_harvest
from saewb.cli import main
from saewb.workspace import Workspace


def _x(table: pa.Table, d: int) -> np.ndarray:
    col = table.column("x").combine_chunks()
    return col.values.to_numpy().reshape(-1, d)


def test_views_return_the_readers_rows_and_join_tokens(
    tiny_lm_ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = Workspace(tiny_lm_ws)
    info = harvest_info(ws)
    view, d, n = info.tables[HOOK], info.hooks[HOOK], info.n_tokens
    assert info.layout == "files" and info.store_dtype == "float16"
    _, ref = read_activations(ws, view, 0, n)
    with activation_sql(ws) as con:
        assert con.sql(f"DESCRIBE {view}").fetchall()[1][:2] == ("x", f"FLOAT[{d}]")
        assert con.sql(f"SELECT count(*), count(DISTINCT tok_idx), max(tok_idx) FROM {view}").fetchall() == [
            (n, n, n - 1)
        ]
        lo, hi = 5990, 6010  # across the two commits' shard files (6000 tokens each)
        got = con.sql(
            f"SELECT tok_idx, x FROM {view} WHERE tok_idx BETWEEN ? AND ? ORDER BY tok_idx", params=[lo, hi]
        ).to_arrow_table()
        assert got.column("tok_idx").to_pylist() == list(range(lo, hi + 1))
        np.testing.assert_array_equal(_x(got, d), ref[lo : hi + 1])
        joined = con.sql(
            f"SELECT t.tok_idx, t.token_str, a.x FROM tokens t JOIN {view} a USING (tok_idx) "
            "WHERE t.harvest = ? AND t.is_special ORDER BY t.tok_idx",
            params=[info.name],
        ).to_arrow_table()
        special = con.execute(
            "SELECT tok_idx FROM tokens WHERE harvest = ? AND is_special ORDER BY tok_idx", [info.name]
        ).fetchall()
    idx = np.array(joined.column("tok_idx").to_pylist())
    assert len(idx) > 10 and idx.tolist() == [r[0] for r in special]
    np.testing.assert_array_equal(_x(joined, d), ref[idx])
    # The notebook API: one query, a DataFrame; the views live on its connection only.
    frame = saewb.sql(tiny_lm_ws, f"SELECT tok_idx, x FROM {view} WHERE tok_idx IN (3, 7000) ORDER BY 1")
    assert frame["tok_idx"].tolist() == [3, 7000]
    np.testing.assert_array_equal(np.stack(frame["x"].to_list()).astype(np.float32), ref[[3, 7000]])
    with duckdb.connect(str(tiny_lm_ws), read_only=True) as plain:
        assert plain.execute(
            "SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [view]
        ).fetchone() == (0,)
    with pytest.raises(saewb.UsageError, match="act__nope"):
        saewb.sql(tiny_lm_ws, "SELECT * FROM act__nope")
    # The command line: the same query, printed; a bad one is one line naming the problem.
    assert main(["sql", str(tiny_lm_ws), f"SELECT count(*) AS rows FROM {view}", "--csv"]) == 0
    assert capsys.readouterr().out.split() == ["rows", str(n)]
    assert main(["sql", str(tiny_lm_ws), "SELECT * FROM act__nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert "act__nope" in err and "SHOW TABLES" in err and len(err.splitlines()) == 1


def _synthetic_harvest(path: Path, dtype: str, commits: int, rows: int, d: int) -> np.ndarray:
    """A shard-file harvest written through the harvest's own commit path, activations random
    (no model); returns the float32 rows it was given."""
    ws = Workspace(path)
    identity = {"model": "synthetic", "hooks": ["h"], "ctx_len": rows, "dtype": dtype}
    info = register_harvest(ws, "syn", {"identity": identity}, "synthetic", rows, {"h": d})
    x = np.random.default_rng(0).standard_normal((commits * rows, d)).astype(np.float32)
    for c in range(commits):
        tok = np.arange(c * rows, (c + 1) * rows, dtype=np.int64)
        tokens = pa.table(
            {
                "harvest": pa.array(["syn"] * rows),
                "tok_idx": tok,
                "doc_id": np.full(rows, c, dtype=np.int64),
                "pos": (tok - c * rows).astype(np.int32),
                "seq_id": np.full(rows, c, dtype=np.int64),
                "seq_pos": (tok - c * rows).astype(np.int32),
                "token_id": (tok % 97).astype(np.int32),
                "token_str": pa.array([f"t{i % 97}" for i in tok]),
                "is_special": tok % rows == 0,
                "role": pa.nulls(rows, pa.string()),
            }
        )
        docs = pa.table({"harvest": ["syn"], "doc_id": [c], "source": ["synthetic"], "text": ["."]})
        raw = encode(x[c * rows : (c + 1) * rows], dtype)
        commit_rows(ws, info, docs, tokens, [], {"h": raw}, c * rows, (c + 1, (c + 1) * rows, c + 1))
    return x


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_views_gather_any_rows_in_every_store_dtype_and_read_shards_lazily(
    tmp_path: Path, dtype: str
) -> None:
    path, d = tmp_path / "syn.duckdb", 24
    given = _synthetic_harvest(path, dtype, commits=3, rows=700, d=d)
    ws = Workspace(path)
    view = harvest_info(ws).tables["h"]
    _, ref = read_activations(ws, view, 0, 2100)
    assert not np.array_equal(ref, given) if dtype == "bfloat16" else np.array_equal(ref, given)
    pick = np.random.default_rng(1).permutation(2100)[:300]  # unordered, from every shard file
    with activation_sql(ws) as con:
        got = con.sql(
            f"SELECT tok_idx, x FROM {view} WHERE tok_idx IN (SELECT unnest(?::BIGINT[]))",
            params=[pick.tolist()],
        ).to_arrow_table()
        np.testing.assert_array_equal(_x(got, d), ref[got.column("tok_idx").to_numpy()])
        assert sorted(got.column("tok_idx").to_pylist()) == sorted(pick.tolist())
    # Only the shard files a query's rows are in get read: without the middle one, a count and a
    # range in the others still work; its rows name the missing file.
    (acts_dir(ws) / view / f"{700:012d}.bin").unlink()
    with activation_sql(ws) as con:
        assert con.sql(f"SELECT count(*) FROM {view}").fetchall() == [(2100,)]
        got = con.sql(f"SELECT x FROM {view} WHERE tok_idx >= 1400 ORDER BY tok_idx").to_arrow_table()
        np.testing.assert_array_equal(_x(got, d), ref[1400:])
        with pytest.raises(Exception, match=f"{700:012d}.bin is missing"):
            con.sql(f"SELECT x FROM {view} WHERE tok_idx = 900").fetchall()
