"""The app and running jobs share a workspace: real server, real harvest and training processes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from test_app_e2e import browser  # noqa: F401 - fixture

from app.serve import running_server

HARVEST_RE = re.compile(r"harvest live · minilm · ([\d,]+) tokens")


def test_app_shows_jobs_progress_without_blocking_them(browser, demo_ws: Path, tmp_path: Path) -> None:  # noqa: F811
    ws = tmp_path / "live.duckdb"  # a copy: the shared demo workspace stays as other tests expect it
    shutil.copy(demo_ws, ws)
    shutil.copytree(demo_ws.with_suffix(".runs"), ws.with_suffix(".runs"))
    with running_server(ws) as server:
        _watch_jobs(server.url, browser, ws)


def _watch_jobs(server: str, browser, demo_ws: Path) -> None:  # noqa: F811
    cli = [sys.executable, "-m", "saewb.cli"]
    harvest = subprocess.Popen(
        [
            *cli,
            "harvest",
            "--workspace",
            str(demo_ws),
            "--name",
            "live",
            "--hook",
            "blocks.2.hook_out",
            "--ctx-len",
            "64",
            "--max-tokens",
            "12000",
            "--commit-tokens",
            "1000",
            "--batch-size",
            "8",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    train = subprocess.Popen(
        [
            *cli,
            "train",
            "--workspace",
            str(demo_ws),
            "--harvest",
            "default",
            "--hook",
            "blocks.2.hook_out",
            "--arch",
            "topk",
            "--n-latents",
            "256",
            "--k",
            "8",
            "--train-tokens",
            "30000",
            "--batch-size",
            "512",
            "--log-every",
            "5",
            "--seed",
            "1",
            "--name",
            "live-train",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    page = browser.new_page()  # type: ignore[attr-defined]
    page.set_default_timeout(120_000)
    page.goto(server + "/")
    page.get_by_role("heading", name="Runs").first.wait_for()
    seen: list[int] = []
    saw_training = False
    deadline = time.monotonic() + 400
    while (harvest.poll() is None or train.poll() is None) and time.monotonic() < deadline:
        page.wait_for_timeout(1500)  # the page refreshes itself; nothing reloads it
        text = page.inner_text("body")
        if m := HARVEST_RE.search(text):
            seen.append(int(m.group(1).replace(",", "")))
        saw_training = saw_training or "live-train" in text
    assert harvest.wait(timeout=60) == 0, harvest.stderr.read() if harvest.stderr else ""
    assert train.wait(timeout=60) == 0, train.stderr.read() if train.stderr else ""
    page.wait_for_timeout(4000)
    final = HARVEST_RE.search(page.inner_text("body"))
    assert final and int(final.group(1).replace(",", "")) >= 12000  # the page caught up with the job
    assert len(set(seen)) >= 2 and seen == sorted(seen)  # it showed the harvest growing while it ran
    assert saw_training
    page.close()
