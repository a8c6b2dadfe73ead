"""Fault injection against the real command line: bad numbers, non-finite data, diverging runs, a
full disk, a read-only file system, a foreign file, empty inputs and SIGKILL, each followed by what a
user does next (free space, lower the lr, run the same command again).

A fault must end in one line naming the problem and the fix (never a traceback), keep what was
written, and never leave a NaN or diverged run marked done. The disk faults mount small tmpfs file
systems (CI runs as root); where mounting is not allowed they are skipped with that reason.

Already covered elsewhere and not repeated here: SIGKILL of a harvest (test_resume_and_concurrency)
and of `train` (test_sae_checkpoint), both resumed and compared with an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import test_sweep

from saewb.cli import main as saewb
from saewb.workspace import Workspace

HOOK = "blocks.1.hook_out"
HOOKS = test_sweep.HOOKS
ws_template = test_sweep.ws_template
"""A synthetic workspace (module fixture of test_sweep): two hooks, 4000 tokens, no model needed."""
ws = test_sweep.ws
"""A private copy of it per test."""
ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    "--hook",
    HOOK,
    "--arch",
    "topk",
    "--n-latents",
    "32",
    "--k",
    "4",
    "--train-tokens",
    "2048",
    "--batch-size",
    "64",
    "--log-every",
    "4",
    "--ckpt-every",
    "8",
    "--init-sample-tokens",
    "512",
    "--eval-tokens",
    "256",
    "--no-progress",
]


def _sweep_file(ws: Path, members: list[dict], train_tokens: int, **train: int) -> Path:
    """A sweep YAML beside `ws` on HOOK (members default to n_latents 32, k 4)."""
    import yaml

    spec = {
        "workspace": str(ws),
        "name": "sw",
        "hook": HOOK,
        "progress": False,
        "eval_tokens": 0,
        "train": {"train_tokens": train_tokens, "batch_size": 64, "init_sample_tokens": 512, **train},
        "defaults": {"n_latents": 32, "k": 4},
        "members": members,
    }
    path = ws.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def _one_error_line(err: str, command: str) -> str:
    """The user-facing error: exactly one `saewb COMMAND: error:` line and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("saewb ")]
    assert len(lines) == 1 and lines[0].startswith(f"saewb {command}: error: "), err
    return lines[0]


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert saewb(argv) == 1
    return _one_error_line(capsys.readouterr().err, argv[0])


def _run_row(ws: Path, name: str) -> dict | None:
    from sae import runs

    return runs.get_run(Workspace(ws), name)


def _final_params(ws: Path, name: str) -> dict[str, np.ndarray]:
    import sae
    from sae.checkpoint import flatten

    return flatten(sae.load(name, workspace=ws).params)


@contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); the disk faults need root"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


# --------------------------------------------------------------------------- hyper-parameter ranges


def test_every_numeric_field_of_every_config_has_a_range() -> None:
    from sae.base import RANGES, registry
    from sae.trainer import TrainConfig

    for cls in (TrainConfig, *(m.Config for m in registry().values())):
        for f in dataclasses.fields(cls):
            if str(f.type).split(" |")[0] in ("int", "float", "tuple[int, ...]", "tuple[float, ...]"):
                assert f.name in RANGES, f"{cls.__name__}.{f.name} has no range in sae.base.RANGES"


@pytest.mark.parametrize(
    ("arch", "flag", "value", "needle"),
    [
        ("topk", "--lr", "-1", "--lr must be > 0, got -1"),
        ("topk", "--lr", "nan", "--lr must be > 0"),
        ("topk", "--grad-clip", "0", "--grad-clip must be > 0"),
        ("topk", "--adam-b1", "1", "--adam-b1 must be in [0, 1)"),
        ("topk", "--warmup-steps", "-5", "--warmup-steps must be >= 0"),
        ("topk", "--dense-threshold", "2", "--dense-threshold must be in [0, 1]"),
        ("topk", "--seed", "-1", "--seed must be >= 0"),
        ("topk", "--aux-coef", "-0.5", "--aux-coef must be >= 0"),
        ("relu_l1", "--l1-warmup-frac", "1.5", "--l1-warmup-frac must be in [0, 1]"),
        ("jumprelu", "--l0-coef", "-1", "--l0-coef must be >= 0"),
        ("gba", "--gamma", "-1", "--gamma must be >= 0"),
        ("batchtopk", "--threshold-start-step", "-3", "--threshold-start-step must be >= 0"),
        ("matryoshka", "--init-dec-norm", "0", "--init-dec-norm must be > 0"),
        ("feature_choice", "--aux-zipf-c", "-1", "--aux-zipf-c must be >= 0"),
        ("itda", "--max-atoms", "0", "--max-atoms must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused_before_any_work(
    ws: Path, capsys: pytest.CaptureFixture[str], arch: str, flag: str, value: str, needle: str
) -> None:
    argv = [
        "train",
        "--workspace",
        str(ws),
        "--hook",
        HOOK,
        "--arch",
        arch,
        "--name",
        "bad",
        "--n-latents",
        "32",
        "--train-tokens",
        "2048",
        "--batch-size",
        "64",
        "--no-progress",
        flag,
        value,
    ]
    if arch == "itda":
        argv.remove("--n-latents")
        argv.remove("32")
    assert needle in _fails(capsys, argv)
    assert _run_row(ws, "bad") is None and not (Workspace(ws).runs_dir / "bad").exists()  # nothing started


def test_a_sweep_checks_ranges_from_the_same_place(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _sweep_file(ws, [{"name": "ok"}, {"name": "bad", "lr": -1}], 2048)
    assert "--lr must be > 0, got -1" in _fails(capsys, ["sweep", str(path)])
    assert _run_row(ws, "sw-ok") is None


# --------------------------------------------------------------------------- non-finite data


def _poison(ws: Path, rows: dict[int, float]) -> None:
    """Overwrite activation rows of HOOK with NaN or inf, as a tool writing the workspace directly might."""
    from activations.store import activation_table, quote_ident

    d = HOOKS[HOOK]
    with Workspace(ws).write() as con:
        for tok, value in rows.items():
            con.execute(
                f"UPDATE {quote_ident(activation_table('default', HOOK))} SET x = ?::FLOAT[{d}] "
                "WHERE tok_idx = ?",
                [[value] * d, tok],
            )


def test_nan_and_inf_rows_in_a_workspace_never_train_into_a_done_run(
    ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from activations.store import NonFiniteActivationsError
    from activations.stream import ActivationStream

    rng = np.random.default_rng(0)
    bad = rng.choice(np.flatnonzero(np.arange(4000) % 40 != 0), size=80, replace=False)  # 2% of the tokens
    _poison(ws, {int(t): (float("nan") if i % 2 else float("inf")) for i, t in enumerate(bad)})
    with pytest.raises(NonFiniteActivationsError, match="NaN/inf activation rows"):
        for _ in ActivationStream(ws, HOOK, batch_size=64, split="all").epoch():
            pass
    line = _fails(capsys, ["train", "--workspace", str(ws), *TRAIN, "--name", "nan"])
    assert "NaN/inf activation rows" in line and "harvest again" in line
    row = _run_row(ws, "nan")
    assert row is not None and row["status"] == "failed" and "NaN/inf" in row["reason"]
    assert saewb(["runs", "--workspace", str(ws)]) == 0
    assert "failed" in capsys.readouterr().out

    # Listed as skipped (what `harvest --nonfinite skip` records), the rows are left out and training is sound.
    with Workspace(ws).write() as con:
        con.executemany(
            "INSERT INTO nonfinite_tokens VALUES ('default', ?, ?, ?)",
            [[HOOK, int(t), int(t) // 40] for t in bad],
        )
    stream = ActivationStream(ws, HOOK, batch_size=64, split="all")
    seen = np.concatenate([idx for idx, _ in stream.epoch(with_index=True)])
    assert not set(seen.tolist()) & set(bad.tolist()) and len(seen) == 4000 - 100 - 80  # specials, skipped
    assert saewb(["train", "--workspace", str(ws), *TRAIN, "--name", "skipped"]) == 0
    row = _run_row(ws, "skipped")
    assert row["status"] == "done" and np.isfinite(row["final_metrics"]["fvu"])
    # analyze reads every stored row: the rows still NaN in the table are refused, not turned into NaN statistics
    assert "analysing them would give NaN statistics" in _fails(
        capsys, ["analyze", "skipped", "--workspace", str(ws)]
    )


def _nan_model(src: Path, out: Path, poison: dict[int, float]) -> Path:
    """A copy of the tiny GPT-2 whose embedding rows of some tokens are NaN / inf."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(src)
    with torch.no_grad():
        for tok, value in poison.items():
            model.transformer.wte.weight[tok] = value
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_harvest_refuses_non_finite_activations_or_skips_and_records_them(
    tiny_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    from activations.corpus import stdlib_docs
    from activations.reader import read_activations
    from activations.store import harvest_info, nonfinite_counts
    from activations.stream import ActivationStream

    # Poison two tokens that occur in only a few of the documents harvested.
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    docs_with: dict[int, set[int]] = {}
    for i, doc in enumerate(d for _, d in zip(range(40), stdlib_docs(), strict=False)):
        for t in set(tok(doc.text)["input_ids"]):
            docs_with.setdefault(t, set()).add(i)
    rare = sorted(
        (t for t, ds in docs_with.items() if 1 <= len(ds) <= 2 and t > 300), key=lambda t: min(docs_with[t])
    )
    model = _nan_model(tiny_gpt2, tmp_path / "nan-gpt2", {rare[0]: float("nan"), rare[1]: float("inf")})
    ws = tmp_path / "ws.duckdb"
    argv = [
        "harvest",
        "--model",
        str(model),
        "--hook",
        "blocks.0.hook_out",
        "--ctx-len",
        "64",
        "--max-tokens",
        "3000",
        "--commit-tokens",
        "500",
        "--workspace",
        str(ws),
        "--quiet",
    ]
    line = _fails(capsys, argv)
    assert "NaN or infinite, in documents" in line and "--nonfinite skip" in line
    assert harvest_info(ws).status == "running"  # what was committed before is kept, and resumes

    assert saewb([*argv, "--nonfinite", "skip"]) == 0
    assert "non-finite activation rows stored as zeros" in capsys.readouterr().out
    info = harvest_info(ws)
    counts = nonfinite_counts(Workspace(ws), "default")
    assert info.status == "complete" and 0 < counts["blocks.0.hook_out"] < info.n_tokens
    _, x = read_activations(Workspace(ws), info.tables["blocks.0.hook_out"], 0, info.n_tokens)
    assert np.isfinite(x).all()  # stored as zeros
    stream = ActivationStream(ws, "blocks.0.hook_out", batch_size=100, split="all")
    batches = list(stream.epoch(with_index=True))
    assert all(np.isfinite(x).all() for _, x in batches)
    with Workspace(ws).read() as con:
        skipped = {r[0] for r in con.execute("SELECT tok_idx FROM nonfinite_tokens").fetchall()}
    seen = np.concatenate([idx for idx, _ in batches])
    assert len(skipped) == counts["blocks.0.hook_out"] and not skipped & set(seen.tolist())  # left out
    # A Parquet export carries them: streaming it gives the same tokens
    assert saewb(["export-parquet", str(ws), str(tmp_path / "export")]) == 0
    exported = ActivationStream(tmp_path / "export", "blocks.0.hook_out", batch_size=100, split="all")
    np.testing.assert_array_equal(np.concatenate([i for i, _ in exported.epoch(with_index=True)]), seen)


# --------------------------------------------------------------------------- diverging runs


def _batches(explode_from: int | None = None):
    def batches(start: int) -> Iterator[np.ndarray]:
        step = start
        while True:
            x = np.random.default_rng([9, step]).standard_normal((32, 8)).astype(np.float32) + 1
            yield x * np.float32(1e25) if explode_from is not None and step >= explode_from else x
            step += 1

    return batches


def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_resumes_with_a_lower_lr(
    tmp_path: Path,
) -> None:
    from sae import checkpoint as ckpt
    from sae.topk import TopKConfig
    from sae.trainer import DIVERGED_FILE, RunDivergedError, TrainConfig, train

    cfg = TopKConfig(n_latents=16, k=2)
    tc = TrainConfig(
        train_tokens=32 * 40, batch_size=32, log_every=5, ckpt_every=5, init_sample_tokens=64, lr=1e-2
    )
    run = tmp_path / "run"
    with pytest.raises(
        RunDivergedError, match=r"diverged: the loss turned (nan|inf) at step 25.*step 20\) is kept"
    ):
        train(cfg, tc, _batches(explode_from=22), run_dir=run, progress=False)
    assert int(ckpt.read_manifest(ckpt.latest_checkpoint(run))["step"]) == 20
    assert json.loads((run / DIVERGED_FILE).read_text())["checkpoint_step"] == 20
    with pytest.raises(ValueError, match="only --lr may change"):  # anything else is still refused
        train(cfg, dataclasses.replace(tc, grad_clip=0.5), _batches(), run_dir=run, progress=False)
    lower = dataclasses.replace(tc, lr=1e-3)
    result = train(cfg, lower, _batches(), run_dir=run, progress=False)  # goes on from step 20
    assert result.history[0]["step"] == 25 and np.isfinite(result.final_metrics["fvu"])
    assert not (run / DIVERGED_FILE).exists()


def test_a_huge_lr_ends_failed_with_the_reason_then_a_lower_lr_finishes(
    ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(capsys, ["train", "--workspace", str(ws), *TRAIN, "--name", "hot", "--lr", "1000"])
    assert "diverged: the FVU reached" in line and "lower --lr" in line
    row = _run_row(ws, "hot")
    assert row["status"] == "failed" and row["reason"].startswith("diverged")
    assert saewb(["runs", "--workspace", str(ws)]) == 0
    assert "failed" in capsys.readouterr().out.splitlines()[1]
    assert saewb(["train", "--workspace", str(ws), *TRAIN, "--name", "hot", "--lr", "1e-3"]) == 0
    row = _run_row(ws, "hot")
    assert row["status"] == "done" and np.isfinite(row["final_metrics"]["fvu"]) and row["reason"] is None


def test_a_diverging_sweep_member_fails_and_resumes_with_a_lower_lr(
    ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = [{"name": "calm"}, {"name": "hot", "lr": 1000.0}]
    path = _sweep_file(ws, members, 1024, log_every=4, ckpt_every=8)
    line = _fails(capsys, ["sweep", str(path)])
    assert "sw-hot (diverged: the FVU reached" in line
    assert (
        _run_row(ws, "sw-hot")["reason"].startswith("diverged")
        and _run_row(ws, "sw-calm")["status"] == "failed"
    )
    members[1]["lr"] = 1e-3
    _sweep_file(ws, members, 1024, log_every=4, ckpt_every=8)
    assert saewb(["sweep", str(path)]) == 0
    for name in ("sw-calm", "sw-hot"):
        row = _run_row(ws, name)
        assert row["status"] == "done" and np.isfinite(row["final_metrics"]["train_fvu"])


def test_itda_fit_stops_on_non_finite_data(tmp_path: Path) -> None:
    from sae.itda import ITDAConfig, fit
    from sae.trainer import RunDivergedError, TrainConfig

    tc = TrainConfig(train_tokens=32 * 20, batch_size=32, log_every=5, ckpt_every=5, init_sample_tokens=64)
    with pytest.raises(RunDivergedError, match="diverged: the (loss|fvu) turned"):
        fit(ITDAConfig(k=4, tau=0.3), tc, _batches(explode_from=7), run_dir=tmp_path / "itda", progress=False)


def test_a_non_finite_final_fvu_is_never_marked_done(ws: Path) -> None:
    from sae import runs
    from sae.lifecycle import check_final

    runs.start_run(
        Workspace(ws), "r", harvest="default", hook=HOOK, arch="topk", config={"x": 1}, checkpoint_path=""
    )
    with pytest.raises(RuntimeError, match="non-finite FVU"):
        check_final(Workspace(ws), "r", {"train_fvu": 0.3, "fvu": float("nan")})
    assert _run_row(ws, "r")["status"] == "failed"


# --------------------------------------------------------------------------- the file system


def test_a_foreign_file_is_refused_and_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.duckdb"
    path.write_bytes(b"my notes, not a database\n" * 100)
    before = path.read_bytes()
    for argv in (
        ["runs", "--workspace", str(path)],
        ["train", "--workspace", str(path), *TRAIN, "--name", "r"],
        ["analyze", "r", "--workspace", str(path)],
    ):
        assert "is not a DuckDB workspace" in _fails(capsys, argv)
    assert path.read_bytes() == before
    with pytest.raises(Exception, match="not a DuckDB workspace"):  # --debug lets the error through
        saewb(["--debug", "runs", "--workspace", str(path)])


def test_a_read_only_workspace_reads_but_refuses_writes_in_one_line(
    ws_template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _tmpfs(tmp_path / "ro", "16m") as mnt:
        ws = mnt / "ws.duckdb"
        shutil.copy(ws_template, ws)
        _remount(mnt, "ro")
        before = ws.read_bytes()
        line = _fails(capsys, ["train", "--workspace", str(ws), *TRAIN, "--name", "r"])
        assert "the file system is read-only; the data written so far is intact" in line
        assert saewb(["runs", "--workspace", str(ws)]) == 0  # reading still works
        assert ws.read_bytes() == before


def _harvest_dump(ws: Path) -> tuple[list[tuple], dict[str, np.ndarray]]:
    from activations.reader import read_activations
    from activations.store import harvest_info

    info = harvest_info(ws)
    with Workspace(ws).read() as con:
        toks = con.execute("SELECT tok_idx, doc_id, pos, token_id FROM tokens ORDER BY tok_idx").fetchall()
    return toks, {h: read_activations(Workspace(ws), t, 0, info.n_tokens)[1] for h, t in info.tables.items()}


def test_a_full_disk_during_a_harvest_then_the_same_command_resumes(
    minilm_ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from activations.store import harvest_info

    # The same harvest as the minilm_ws fixture (the uninterrupted reference), into an 8 MB file system.
    argv = [
        "harvest",
        "--model",
        "minilm",
        "--corpus",
        "stdlib-docs",
        "--hook",
        "blocks.1.hook_out",
        "--hook",
        "blocks.2.hook_resid_post",
        "--ctx-len",
        "64",
        "--max-tokens",
        "6000",
        "--commit-tokens",
        "1000",
        "--quiet",
    ]
    with _tmpfs(tmp_path / "small", "8m") as mnt:
        ws = mnt / "ws.duckdb"
        line = _fails(capsys, [*argv, "--workspace", str(ws)])
        assert "no space left on the device; the data written so far is intact" in line
        assert "run the same command again to resume" in line
        partial = harvest_info(ws).n_tokens
        assert 0 < partial < 6000
        _remount(mnt, "size=64m")  # space freed
        assert saewb([*argv, "--workspace", str(ws)]) == 0
        toks, acts = _harvest_dump(ws)
        ref_toks, ref_acts = _harvest_dump(minilm_ws)
        assert toks == ref_toks and [t[0] for t in toks] == list(range(len(toks)))  # no gap, no duplicate
        for hook in ref_acts:
            np.testing.assert_array_equal(acts[hook], ref_acts[hook])


def test_a_full_disk_during_training_then_the_same_command_resumes(
    ws_template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae import checkpoint as ckpt

    argv = ["train", *TRAIN, "--name", "r", "--n-latents", "256", "--ckpt-every", "4"]
    reference = tmp_path / "reference.duckdb"
    shutil.copy(ws_template, reference)
    assert saewb([*argv, "--workspace", str(reference)]) == 0
    one = sum(f.stat().st_size for f in ckpt.latest_checkpoint(Workspace(reference).runs_dir / "r").iterdir())
    ws = tmp_path / "ws.duckdb"
    shutil.copy(ws_template, ws)
    # The checkpoints' file system holds two and a half checkpoints: the third (step 12) does not fit.
    with _tmpfs(Workspace(ws).runs_dir, str(int(2.5 * one))) as runs_dir:
        line = _fails(capsys, [*argv, "--workspace", str(ws)])
        assert "no space left on the device; the data written so far is intact" in line
        assert int(ckpt.read_manifest(ckpt.latest_checkpoint(runs_dir / "r"))["step"]) == 8
        assert _run_row(ws, "r")["status"] == "failed"
        _remount(runs_dir, "size=16m")  # space freed
        assert saewb([*argv, "--workspace", str(ws)]) == 0
        assert _run_row(ws, "r")["status"] == "done"
        a, b = _final_params(ws, "r"), _final_params(reference, "r")
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------- inputs


def test_an_empty_or_blank_corpus_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in (("empty.txt", ""), ("blank.txt", "\n   \n\t\n"), ("blank.jsonl", '{"text": "  "}\n')):
        corpus = tmp_path / name
        corpus.write_text(text)
        ws = tmp_path / f"{name}.duckdb"
        line = _fails(capsys, ["harvest", "--corpus", str(corpus), "--workspace", str(ws), "--quiet"])
        assert "holds no text" in line
        assert not ws.exists()


def test_ctx_len_above_the_models_positions_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(
        capsys,
        [
            "harvest",
            "--model",
            "minilm",
            "--ctx-len",
            "1000",
            "--workspace",
            str(tmp_path / "ws.duckdb"),
            "--quiet",
        ],
    )
    assert "--ctx-len 1000 is more than model 'minilm' can take (512 positions)" in line
    assert not (tmp_path / "ws.duckdb").exists()


def test_the_app_refuses_a_missing_workspace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "typo.duckdb"
    line = _fails(capsys, ["app", str(missing)])
    assert f"saewb harvest --workspace {missing}" in line


# --------------------------------------------------------------------------- SIGKILL, then resume


def _kill_at_random(argv: list[str], ready: Callable[[], bool], seed: int) -> None:
    """Start `saewb argv`, wait until `ready()`, SIGKILL it after a random delay (it must still run)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saewb.cli", *argv],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.2))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_during_a_sweep_then_resume_equals_uninterrupted(ws_template: Path, tmp_path: Path) -> None:
    from sae import runs
    from sae.sweep import load_sweep, plan_sweep, run_sweep

    def sweep_file(ws: Path) -> Path:
        members = [{"name": "a"}, {"name": "b", "k": 6, "seed": 1}]
        return _sweep_file(ws, members, 64 * 96, log_every=8, ckpt_every=8)

    killed, clean = tmp_path / "killed.duckdb", tmp_path / "clean.duckdb"
    shutil.copy(ws_template, killed)
    shutil.copy(ws_template, clean)
    state = Workspace(killed).runs_dir / ".sweeps" / "sw.json"
    seed = random.randrange(1000)
    _kill_at_random(["sweep", str(sweep_file(killed))], state.exists, seed)
    assert state.exists() and json.loads(state.read_text())["step"] < 96, f"seed {seed}: killed after the end"
    run_sweep(plan_sweep(load_sweep(sweep_file(killed))))
    run_sweep(plan_sweep(load_sweep(sweep_file(clean))))
    for name in ("sw-a", "sw-b"):
        a, b = _final_params(killed, name), _final_params(clean, name)
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"seed {seed} {name} {key}")
        steps = [r["step"] for r in runs.run_metrics(Workspace(killed), name)]
        assert steps == list(range(8, 97, 8)), f"seed {seed}"


def test_sigkill_during_analyze_then_rerun_equals_uninterrupted(ws_template: Path, tmp_path: Path) -> None:
    from analysis.features import AnalyzeConfig, analyze_run
    from analysis.tables import PER_LATENT_TABLES

    killed, clean = tmp_path / "killed.duckdb", tmp_path / "clean.duckdb"
    shutil.copy(ws_template, killed)
    assert saewb(["train", "--workspace", str(killed), *TRAIN, "--name", "r"]) == 0
    shutil.copy(killed, clean)
    shutil.copytree(Workspace(killed).runs_dir, Workspace(clean).runs_dir)

    def started() -> bool:
        ws = Workspace(killed)
        if not ws.table_exists("analysis_runs"):
            return False
        with ws.read() as con:
            return bool(con.execute("SELECT 1 FROM analysis_runs WHERE run = 'r'").fetchall())

    seed = random.randrange(1000)
    _kill_at_random(
        ["analyze", "r", "--workspace", str(killed), "--no-logits", "--batch-size", "64", "--no-progress"],
        started,
        seed,
    )
    with Workspace(killed).read() as con:
        assert con.execute("SELECT status FROM analysis_runs").fetchall() == [("running",)], (
            f"seed {seed}: too late"
        )
    cfg = AnalyzeConfig(batch_size=64, logits=False)
    analyze_run(killed, "r", cfg)
    analyze_run(clean, "r", cfg)
    for table in (*PER_LATENT_TABLES, "analysis_runs"):
        query = (
            f"SELECT * EXCLUDE (updated_at) FROM {table} ORDER BY ALL"
            if table == "analysis_runs"
            else f"SELECT * FROM {table} ORDER BY ALL"
        )
        with Workspace(killed).read() as con:
            a = con.execute(query).fetchall()
        with Workspace(clean).read() as con:
            b = con.execute(query).fetchall()
        assert a == b, f"seed {seed}: {table} differs"


def test_every_failure_kind_reads_as_one_line() -> None:
    import errno

    from saewb.errors import describe

    denied = describe(PermissionError(errno.EACCES, "Permission denied", "/data/ws.duckdb"))
    assert denied.startswith(
        "permission denied (/data/ws.duckdb); the data written so far is intact: fix the"
    )
    full = describe(OSError(errno.ENOSPC, "No space left on device"))
    assert full.startswith("no space left on the device; the data written so far is intact")
    ours = describe(ValueError("k=9 must be between 1 and n_latents=8;\n  lower --k"))
    assert ours == "k=9 must be between 1 and n_latents=8; lower --k"
    surprise = describe(TypeError("unsupported operand type(s)\nmore detail"))
    assert (
        surprise == "unexpected TypeError: unsupported operand type(s) (rerun with --debug for the traceback)"
    )
