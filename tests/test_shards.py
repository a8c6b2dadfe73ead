"""Sharded harvests, Parquet exports and the training stream over a set of sources (real tiny GPT-2, real DuckDB)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest

from activations.corpus import stdlib_docs
from activations.harvest import HarvestConfig, run_harvest
from activations.reader import read_activations
from activations.store import HarvestError, acts_dir, harvest_info
from activations.stream import ActivationStream
from saewb.cli import main as saewb
from saewb.workspace import Workspace

HOOKS = ("blocks.0.hook_out", "blocks.1.hook_out")
HOOK = "blocks.1.hook_out"


def _cfg(corpus: Path, tiny: Path, **kw: object) -> HarvestConfig:
    opts: dict = {
        "model": str(tiny),
        "corpus": str(corpus),
        "hooks": HOOKS,
        "ctx_len": 24,
        "commit_tokens": 400,
        "batch_size": 16,
    }
    opts.update(kw)
    return HarvestConfig(**opts)


@pytest.fixture(scope="module")
def harvests(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One unsharded harvest and the two shards of the same corpus, each in its own workspace."""
    root = tmp_path_factory.mktemp("shards")
    texts = [" ".join(d.text.split())[:80] for d in itertools.islice(stdlib_docs(max_chars=60_000), 90)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    out = {"corpus": corpus, "full": root / "full.duckdb", "s0": root / "s0.duckdb", "s1": root / "s1.duckdb"}
    run_harvest(_cfg(corpus, tiny_gpt2), out["full"], progress=False)
    run_harvest(_cfg(corpus, tiny_gpt2, shard=(0, 2)), out["s0"], progress=False)
    # the second shard through the real CLI
    assert (
        saewb(
            [
                "harvest",
                "--workspace",
                str(out["s1"]),
                "--model",
                str(tiny_gpt2),
                "--corpus",
                str(corpus),
                "--hook",
                HOOKS[0],
                "--hook",
                HOOKS[1],
                "--ctx-len",
                "24",
                "--commit-tokens",
                "400",
                "--batch-size",
                "16",
                "--shard",
                "1/2",
                "--quiet",
            ]
        )
        == 0
    )
    return out


def _rows(ws: Path, hook: str) -> tuple[np.ndarray, np.ndarray]:
    """(doc_id, pos, token_id, is_special) rows and activations, in (doc_id, pos) order."""
    info = harvest_info(ws)
    con = duckdb.connect(str(ws), read_only=True)
    t = con.sql(
        "SELECT t.doc_id, t.pos, t.token_id, t.is_special::INT AS sp FROM tokens t ORDER BY t.tok_idx"
    ).to_arrow_table()
    con.close()
    keys = np.stack([t.column(c).to_numpy() for c in ("doc_id", "pos", "token_id", "sp")], axis=1)
    _, x = read_activations(Workspace(ws), info.tables[hook], 0, info.n_tokens)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    return keys[order], x[order]


def test_two_shards_merge_to_the_unsharded_harvest(harvests: dict[str, Path]) -> None:
    i0, i1 = harvest_info(harvests["s0"]), harvest_info(harvests["s1"])
    assert i0.config["identity"]["shard"] == [0, 2] and i1.config["identity"]["shard"] == [1, 2]
    assert i0.n_tokens > 0 and i1.n_tokens > 0 and i0.status == i1.status == "complete"
    for hook in HOOKS:
        full_keys, full_x = _rows(harvests["full"], hook)
        parts = [_rows(harvests[s], hook) for s in ("s0", "s1")]
        assert not set(parts[0][0][:, 0]) & set(parts[1][0][:, 0])  # disjoint documents
        keys = np.concatenate([p[0] for p in parts])
        x = np.concatenate([p[1] for p in parts])
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        np.testing.assert_array_equal(keys[order], full_keys)  # same doc ids, positions, token ids
        # Other batch neighbours and padding lengths change the float summation order a little, which
        # can move a value to the next float16 (the store dtype): 2^-10 relative.
        np.testing.assert_allclose(x[order], full_x, rtol=1e-3, atol=1e-5)
    got = []
    for s in ("s0", "s1"):
        c = duckdb.connect(str(harvests[s]), read_only=True)
        got += c.execute("SELECT doc_id, source, text FROM documents").fetchall()
        c.close()
    c = duckdb.connect(str(harvests["full"]), read_only=True)
    assert sorted(got) == sorted(c.execute("SELECT doc_id, source, text FROM documents").fetchall())
    c.close()


def test_shard_resumes_and_refuses_another_shard(
    harvests: dict[str, Path], tiny_gpt2: Path, tmp_path: Path
) -> None:
    ws = tmp_path / "s0.duckdb"
    ws.write_bytes(harvests["s0"].read_bytes())
    shutil.copytree(
        acts_dir(Workspace(harvests["s0"])), acts_dir(Workspace(ws))
    )  # the workspace's shard files
    # Leave the state a kill leaves: the committed prefix up to a window boundary, status running.
    con = duckdb.connect(str(ws))
    info = harvest_info(harvests["s0"])
    starts = [r[0] for r in con.execute("SELECT DISTINCT start FROM act_shards ORDER BY start").fetchall()]
    n_keep = starts[len(starts) // 2]  # a commit boundary half way
    cut = con.execute("SELECT seq_id FROM tokens WHERE tok_idx = ?", [n_keep]).fetchone()[0]
    con.execute(
        "DELETE FROM documents WHERE doc_id NOT IN (SELECT doc_id FROM tokens WHERE seq_id < ? AND pos < 24)",
        [cut],
    )
    con.execute("DELETE FROM tokens WHERE seq_id >= ?", [cut])
    con.execute("DELETE FROM act_shards WHERE start >= ?", [n_keep])  # their files stay, as orphans
    n_docs = con.execute("SELECT count(*) FROM documents").fetchone()[0]
    con.execute(
        "UPDATE harvests SET status = 'running', n_windows = ?, n_tokens = ?, n_docs = ?",
        [cut, n_keep, n_docs],
    )
    con.close()
    with pytest.raises(HarvestError, match="shard"):
        run_harvest(_cfg(harvests["corpus"], tiny_gpt2, shard=(1, 2)), ws, progress=False)
    resumed = run_harvest(_cfg(harvests["corpus"], tiny_gpt2, shard=(0, 2)), ws, progress=False)
    assert (resumed.n_tokens, resumed.n_windows, resumed.n_docs) == (
        info.n_tokens,
        info.n_windows,
        info.n_docs,
    )
    a, b = duckdb.connect(str(ws), read_only=True), duckdb.connect(str(harvests["s0"]), read_only=True)
    q = "SELECT tok_idx, doc_id, pos, token_id FROM tokens ORDER BY tok_idx"
    assert a.execute(q).fetchall() == b.execute(q).fetchall()
    a.close()
    b.close()
    np.testing.assert_array_equal(_rows(ws, HOOK)[1], _rows(harvests["s0"], HOOK)[1])


@pytest.mark.parametrize("bad", ["2/2", "0/0", "a/b", "3", "-1/2", "1/2/3"])
def test_bad_shard_values_are_refused_before_work(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ws = tmp_path / "never.duckdb"
    assert (
        saewb(["harvest", "--workspace", str(ws), "--model", "no-such-model", f"--shard={bad}", "--quiet"])
        == 1
    )
    err = capsys.readouterr().err
    assert "shard" in err and ("i/N" in err or "0.." in err or "at least 1" in err)
    assert not ws.exists()


def _epoch(sources: object, split: str = "train", seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    s = ActivationStream(
        sources,
        HOOK,
        batch_size=64,
        seed=seed,
        split=split,
        eval_fraction=0.2,  # type: ignore[arg-type]
        chunk_tokens=256,
        buffer_tokens=512,
    )
    idx, x = zip(*s.epoch(with_index=True), strict=True)
    return np.concatenate(idx), np.concatenate(x)


def _keyed(sources: list[Path], idx: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one epoch as (doc_id, pos) keys, via each part's global index offset, sorted."""
    keys, offset = [], 0
    table = np.zeros((0, 2), dtype=np.int64)
    for src in sources:
        c = duckdb.connect(str(src), read_only=True)
        part = np.array(
            c.execute("SELECT doc_id, pos FROM tokens ORDER BY tok_idx").fetchall(), dtype=np.int64
        )
        c.close()
        table = np.concatenate([table, part])
        offset += len(part)
    keys = table[idx]
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    return keys[order], x[order]


def test_stream_over_shards_yields_the_unsharded_tokens(harvests: dict[str, Path]) -> None:
    shards = [harvests["s0"], harvests["s1"]]
    for split in ("train", "eval"):
        idx_full, x_full = _epoch(harvests["full"], split)
        idx_set, x_set = _epoch([str(p) for p in shards], split)
        assert len(idx_set) == len(np.unique(idx_set)) == len(idx_full) > 0
        k_full, x_full = _keyed([harvests["full"]], idx_full, x_full)
        k_set, x_set = _keyed(shards, idx_set, x_set)
        np.testing.assert_array_equal(k_set, k_full)  # the same tokens, the same split by document
        # one float16 step apart at most, as in the test above (other batch neighbours)
        np.testing.assert_allclose(x_set, x_full, rtol=1e-3, atol=1e-5)
    # one index space: the shards' tokens follow each other, and the order is seeded and seekable
    s = ActivationStream(shards, HOOK, batch_size=64, seed=1, chunk_tokens=256, buffer_tokens=512)
    assert s.n_committed == sum(harvest_info(p).n_tokens for p in shards)
    it = s.batches(with_index=True)
    ref = [next(it)[0] for _ in range(s.batches_per_epoch + 3)]
    assert max(r.max() for r in ref) >= harvest_info(shards[0]).n_tokens  # reaches the second shard
    again = s.batches(start=s.batches_per_epoch - 1, with_index=True)
    for k in range(s.batches_per_epoch - 1, len(ref)):
        np.testing.assert_array_equal(next(again)[0], ref[k])
    with pytest.raises(HarvestError, match="twice|same harvest|shard 0/2"):
        ActivationStream([shards[0], shards[0]], HOOK)


def test_parquet_export_round_trips(
    harvests: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "s1.parquet"
    assert saewb(["export-parquet", str(harvests["s1"]), str(out)]) == 0
    manifest = json.loads((out / "harvest.json").read_text())
    info = harvest_info(harvests["s1"])
    assert manifest["n_tokens"] == info.n_tokens and set(manifest["hooks"]) == set(HOOKS)
    con = duckdb.connect()
    con.execute("ATTACH ? AS ws (READ_ONLY)", [str(harvests["s1"])])
    for table, file in [("tokens", "tokens.parquet"), ("documents", "documents.parquet")]:
        for a, b in [(f"ws.{table}", "read_parquet(?)"), ("read_parquet(?)", f"ws.{table}")]:
            assert con.execute(
                f"SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b})", [str(out / file)]
            ).fetchone() == (0,)
    for hook in HOOKS:
        d, file = manifest["hooks"][hook]["d"], str(out / manifest["hooks"][hook]["file"])
        typ = con.execute(f"SELECT typeof(x::FLOAT[{d}]) FROM read_parquet(?) LIMIT 1", [file]).fetchall()[0][
            0
        ]
        assert typ == f"FLOAT[{d}]"
        query = f"SELECT tok_idx, x::FLOAT[{d}] AS x FROM read_parquet(?) ORDER BY tok_idx"
        exported = con.sql(query, params=[file]).to_arrow_table()
        idx, x = read_activations(Workspace(harvests["s1"]), info.tables[hook], 0, info.n_tokens)
        np.testing.assert_array_equal(exported.column("tok_idx").to_numpy(), idx)
        values = exported.column("x").combine_chunks().values.to_numpy()
        np.testing.assert_array_equal(values.reshape(-1, d), x)
        meta = dict(
            con.execute("SELECT key::VARCHAR, value::VARCHAR FROM parquet_kv_metadata(?)", [file]).fetchall()
        )
        assert meta["saewb.d"] == str(d)
    con.close()
    # the stream reads the export exactly as the workspace, alone or in a set with a workspace
    a = ActivationStream(harvests["s1"], HOOK, batch_size=50, seed=2, chunk_tokens=256, buffer_tokens=512)
    b = ActivationStream(out, HOOK, batch_size=50, seed=2, chunk_tokens=256, buffer_tokens=512)
    for (ia, xa), (ib, xb) in itertools.islice(
        zip(a.batches(with_index=True), b.batches(with_index=True), strict=True), 12
    ):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(xa, xb)
    mixed = _epoch([harvests["s0"], out])
    plain = _epoch([harvests["s0"], harvests["s1"]])
    np.testing.assert_array_equal(mixed[0], plain[0])
    np.testing.assert_array_equal(mixed[1], plain[1])
    assert saewb(["export-parquet", str(harvests["s1"]), str(out)]) == 1
    assert "already holds an export" in capsys.readouterr().err


def test_train_and_eval_on_a_set_of_shards(
    harvests: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from analysis.evaluate import list_evals
    from sae import runs
    from saewb.workspace import Workspace

    home = tmp_path / "home.duckdb"
    home.write_bytes(harvests["s0"].read_bytes())
    out = tmp_path / "s1.parquet"
    assert saewb(["export-parquet", str(harvests["s1"]), str(out)]) == 0
    common = [
        "--hook",
        HOOK,
        "--arch",
        "topk",
        "--n-latents",
        "64",
        "--k",
        "4",
        "--train-tokens",
        "512",
        "--batch-size",
        "64",
        "--init-sample-tokens",
        "256",
        "--eval-tokens",
        "256",
        "--no-progress",
    ]
    assert saewb(["train", "--workspace", str(home), "--workspace", str(out), "--name", "set", *common]) == 0
    row = runs.get_run(Workspace(home), "set")
    assert row["status"] == "done" and row["config"]["sources"] == [str(home.resolve()), str(out.resolve())]
    assert saewb(["eval", "set", "--workspace", str(home), "--no-downstream"]) == 0
    ev = list_evals(home, "set")[-1]["metrics"]
    held_out = ActivationStream([harvests["s0"], harvests["s1"]], HOOK, split="eval", eval_fraction=0.05)
    assert ev["eval_tokens"] == held_out.n_tokens > ActivationStream(home, HOOK, split="eval").n_tokens
    assert np.isfinite(ev["fvu"])
    # a Parquet export cannot hold the run
    capsys.readouterr()
    assert saewb(["train", "--workspace", str(out), "--name", "x", *common]) == 1
    assert "must be a workspace .duckdb file" in capsys.readouterr().err
