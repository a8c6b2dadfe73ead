"""One progress policy for every long command: live bars on a terminal, sparse plain lines in a log."""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

from conftest import REPO, SAEWB

from saewb.progress import INTERVAL_ENV, LogProgress

LINE = re.compile(r"^analyze demo: pass 1: [\d.]+k?/[\d.]+k tok \(\d+%\), [\d.]+k? tok/s, ETA [\d.:]+( s)?$")
SUMMARY = re.compile(r"^analyze demo: pass 1: done, ([\d.]+k?) tok in ([\d.]+) s \([\d.]+k? tok/s\)$")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_follow_the_interval_and_the_tenths() -> None:
    clock, out = Clock(), io.StringIO()
    bar = LogProgress("train topk", 1000, unit="step", interval=10.0, stream=out, clock=clock)
    for i in range(1000):  # a slow job: 0.5 s a step, 500 s in all
        clock.now += 0.5
        bar.update()
        if i == 500:
            bar.set_postfix(fvu="0.1234")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 500 // 10 - 1 + 1  # one every 10 s (none at the very end), then the summary
    assert lines[0] == "train topk: 20/1,000 step (2%), 2 step/s, ETA 08:10"
    assert lines[-2].endswith("ETA 10.0 s, fvu=0.1234")
    assert lines[-1] == "train topk: done, 1,000 step in 08:20 (2 step/s), fvu=0.1234"

    clock, out = Clock(), io.StringIO()
    fast = LogProgress(
        "harvest x", 12_800, unit="tok", unit_scale=True, interval=10.0, stream=out, clock=clock
    )
    for _ in range(1280):  # a fast job: 1/128 s a step (exact in binary); a line at each new tenth
        clock.now += 1 / 128
        fast.update(10)
    fast.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[1].split(")")[0] for line in lines[:-1]] == [f"{p}%" for p in range(10, 100, 10)]
    assert lines[-1] == "harvest x: done, 12.8k tok in 10.0 s (1.28k tok/s)"


def test_log_summary_says_where_an_interrupted_job_stopped() -> None:
    clock, out = Clock(), io.StringIO()
    bar = LogProgress("sweep x4", 200, unit="step", interval=10.0, stream=out, clock=clock)
    clock.now = 0.5
    bar.update(50)  # a quarter done, but within a tenth of the interval: no line yet
    clock.now = 3.0
    bar.close()
    bar.close()  # once only
    assert out.getvalue() == "sweep x4: stopped at 25%, 50 step in 3.0 s (16.7 step/s)\n"


def test_piped_analyze_writes_few_plain_lines_and_a_summary(demo_ws: Path, tmp_path: Path) -> None:
    """The real command with its output in a file, as in a batch job, with the interval cut to 0.2 s."""
    ws = tmp_path / "copy.duckdb"  # analyze rewrites the run's tables: the shared workspace stays as it is
    shutil.copy(demo_ws, ws)
    shutil.copytree(demo_ws.with_suffix(".runs"), ws.with_suffix(".runs"))
    interval = 0.2
    log = tmp_path / "analyze.log"
    with log.open("w") as out:
        proc = subprocess.run(
            [*SAEWB, "analyze", "demo", "--workspace", str(ws), "--batch-size", "128", "--no-logits"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            timeout=300,
            env={**os.environ, INTERVAL_ENV: str(interval)},
        )
    raw = log.read_bytes()  # bytes: read_text() would turn carriage returns into newlines
    text = raw.decode()
    assert proc.returncode == 0, text
    assert b"\r" not in raw, text
    lines = text.splitlines()
    progress = [line for line in lines if line.startswith("analyze demo: pass 1:")]
    summary = SUMMARY.match(progress[-1])
    assert summary, text
    assert all(LINE.match(line) for line in progress[:-1]), text  # each line: count, share, rate and ETA
    pass_s = float(summary.group(2))
    # about 60 batches of 128 tokens: a handful of lines, never one per batch
    assert 1 <= len(progress) - 1 <= math.ceil(pass_s / interval) + 10, text
    assert lines[-1].startswith("analysed run 'demo':")
    assert len(lines) == len(progress) + 1, text  # nothing else: no library bars (e.g. "Loading weights")


def test_one_module_owns_progress_output() -> None:
    """No per-module copies: only saewb/progress.py makes bars, and no module draws with carriage returns."""
    owners = []
    for package in ("activations", "sae", "analysis", "app", "saewb"):
        for path in (REPO / package).rglob("*.py"):
            source = path.read_text()
            if path.name != "progress.py" and ("tqdm" in source or re.search(r"print\(f?[\"']\\r", source)):
                owners.append(str(path.relative_to(REPO)))
    assert owners == []
