"""The training stream over a real harvest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from activations.reader import HookReader
from activations.store import HarvestError, acts_dir
from activations.stream import ActivationStream, read_ahead
from saewb.workspace import Workspace


def _stream(ws: Path, **kw: object) -> ActivationStream:
    opts = {"batch_size": 256, "chunk_tokens": 512, "buffer_tokens": 1024, "seed": 3}
    opts.update(kw)
    return ActivationStream(ws, "blocks.2.hook_out", **opts)  # type: ignore[arg-type]


def test_one_epoch_yields_every_token_exactly_once(minilm_ws: Path) -> None:
    s = _stream(minilm_ws, split="all")
    idx = np.concatenate([i for i, _ in s.epoch(with_index=True)])
    con = duckdb.connect(str(minilm_ws), read_only=True)
    expected = [
        r[0]
        for r in con.execute("SELECT tok_idx FROM tokens WHERE NOT is_special ORDER BY tok_idx").fetchall()
    ]
    con.close()
    assert len(idx) == len(expected) == s.n_tokens
    assert sorted(idx.tolist()) == expected  # nothing twice, nothing missing, no special token


def test_batches_carry_the_right_rows(minilm_ws: Path) -> None:
    s = _stream(minilm_ws, split="all")
    idx, x = next(s.batches(with_index=True))
    assert x.dtype == np.float32 and x.shape == (256, s.d)
    # The row as the shard file holds it (float16, the default store dtype), read without the reader.
    con = duckdb.connect(str(minilm_ws), read_only=True)
    start, file = con.execute(
        "SELECT start, file FROM act_shards WHERE hook = 'blocks.2.hook_out' AND start <= ? AND ? < stop",
        [int(idx[7]), int(idx[7])],
    ).fetchone()
    con.close()
    stored = np.fromfile(acts_dir(Workspace(minilm_ws)) / file, dtype="<f2").reshape(-1, s.d)
    np.testing.assert_array_equal(stored[int(idx[7]) - start].astype(np.float32), x[7])


def test_shuffle_reaches_the_whole_cache(minilm_ws: Path) -> None:
    s = _stream(minilm_ws, split="all")
    n = s.n_committed
    # The first batch already mixes tokens from far-apart parts of the cache ...
    idx, _ = next(s.batches(with_index=True))
    assert idx.max() - idx.min() > n // 3
    assert not np.all(np.diff(idx) > 0)
    # ... and across seeds the first batches together touch every region of it.
    firsts = np.concatenate(
        [next(_stream(minilm_ws, split="all", seed=k).batches(with_index=True))[0] for k in range(8)]
    )
    regions = set((firsts * 10 // n).tolist())
    assert regions == set(range(10))


def test_seek_resumes_the_exact_sequence_across_epochs(minilm_ws: Path) -> None:
    s = _stream(minilm_ws)
    per_epoch = s.batches_per_epoch
    it = s.batches(with_index=True)
    reference = [next(it)[0] for _ in range(per_epoch + 5)]
    for start in (1, per_epoch - 1, per_epoch + 2):
        again = s.batches(start=start, with_index=True)
        for k in range(start, per_epoch + 5):
            np.testing.assert_array_equal(next(again)[0], reference[k])
    # the second epoch is a different permutation of the same tokens
    e0 = np.concatenate([i for i, _ in s.epoch(0, with_index=True)])
    e1 = np.concatenate([i for i, _ in s.epoch(1, with_index=True)])
    assert sorted(e0.tolist()) == sorted(e1.tolist()) and not np.array_equal(e0, e1)


def test_train_eval_split_by_document(minilm_ws: Path) -> None:
    train = _stream(minilm_ws, split="train", eval_fraction=0.2)
    held = _stream(minilm_ws, split="eval", eval_fraction=0.2)
    everything = _stream(minilm_ws, split="all")
    t = np.concatenate([i for i, _ in train.epoch(with_index=True)])
    e = np.concatenate([i for i, _ in held.epoch(with_index=True)])
    assert len(np.intersect1d(t, e)) == 0 and len(t) + len(e) == everything.n_tokens
    con = duckdb.connect(str(minilm_ws), read_only=True)
    docs_t = {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT doc_id FROM tokens WHERE list_contains(?, tok_idx)", [t.tolist()]
        ).fetchall()
    }
    docs_e = {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT doc_id FROM tokens WHERE list_contains(?, tok_idx)", [e.tolist()]
        ).fetchall()
    }
    con.close()
    assert docs_t.isdisjoint(docs_e) and docs_e
    assert 0.05 < len(e) / everything.n_tokens < 0.4


def test_special_tokens_can_be_kept(minilm_ws: Path) -> None:
    with_special = _stream(minilm_ws, split="all", exclude_special=False)
    without = _stream(minilm_ws, split="all")
    assert with_special.n_tokens == with_special.n_committed > without.n_tokens


def test_seeds_differ_and_repeat(minilm_ws: Path) -> None:
    a = next(_stream(minilm_ws, seed=1).batches(with_index=True))[0]
    b = next(_stream(minilm_ws, seed=1).batches(with_index=True))[0]
    c = next(_stream(minilm_ws, seed=2).batches(with_index=True))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unknown_hook_lists_the_harvested_ones(minilm_ws: Path) -> None:
    with pytest.raises(HarvestError, match="blocks.1.hook_out, blocks.2.hook_out"):
        ActivationStream(minilm_ws, "blocks.5.hook_out")


def test_the_stream_reads_one_buffer_ahead_and_no_more(
    minilm_ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While buffer g is handed out, buffer g + 1 (and nothing else) is read on the read-ahead thread;
    a restarted stream starts over with the same batches."""
    s = _stream(minilm_ws)
    reads: list[int] = []  # the first tok_idx of every chunk the stream reads, in order
    read = HookReader.read

    def counted(self: HookReader, con: Any, lo: int, hi: int, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        reads.append(lo)
        return read(self, con, lo, hi, **kw)

    def settled() -> list[int]:
        read_ahead().submit(lambda: None).result()  # the one read-ahead thread is idle
        return sorted(reads)

    monkeypatch.setattr(HookReader, "read", counted)
    groups, sizes = s.buffers(0)
    chunk_starts = [sorted(int(c) * s.chunk_tokens for c in g) for g in groups]
    assert len(groups) >= 3 and sizes[0] >= 2 * s.batch_size
    it = s.batches(with_index=True)
    first = next(it)[0]
    assert settled() == sorted(chunk_starts[0] + chunk_starts[1])
    next(it)  # still buffer 0: nothing more is read
    assert settled() == sorted(chunk_starts[0] + chunk_starts[1])
    np.testing.assert_array_equal(next(s.batches(with_index=True))[0], first)
