"""The app's server process: warm the newest run's model and SAE, then serve Streamlit.

`saewb app` runs ``python -m app.serve <streamlit flags>``. Streamlit only executes the app script
when a browser connects, so a warm-up started from a page runs too late for a user who opens the
text inspector first (measured: 4.9 s for that first render). Here the load starts with the server
and runs beside it: the model, the SAE and the JIT-compiled encoder for every input-size bucket are
in the process-wide ``st.cache_resource`` cache before the first user arrives.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAIN = Path(__file__).with_name("main.py")
READY_MARK = "saewb app: model and SAE ready for run"


def newest_done_run(path: str) -> str | None:
    """The most recently finished run of a workspace, or None (no workspace, no finished run)."""
    from sae import runs
    from saewb.workspace import Workspace

    return runs.newest_done_run(Workspace(path))


def warm_up(path: str, run: str) -> float:
    """Load `run`'s model and SAE into the resource cache and compile its encoder; seconds taken."""
    import numpy as np
    import torch

    from app.inference import MODEL_LOCK, model_and_run
    from sae.api import shape_buckets

    t0 = time.perf_counter()
    model, ctx = model_and_run(path, run)
    ids = torch.zeros((1, 8), dtype=torch.long)
    with MODEL_LOCK, torch.inference_mode():
        model.run_with_cache(ids, names_filter=[ctx.hook])  # first-call setup of the hooks
    for rows in shape_buckets(512):
        ctx.sae.encode(np.zeros((rows, ctx.sae.d), np.float32))
    return time.perf_counter() - t0


_WARMED: set[tuple[str, str]] = set()
_WARMED_LOCK = threading.Lock()
_WARM_THREADS: list[threading.Thread] = []


def start_warm_up(path: str) -> None:
    """Warm the newest finished run of `path` in a background thread, once per process and run.

    Page scripts are re-executed on every rerun, so the once-only memory lives here, in a module.
    """
    run = newest_done_run(path)
    if run is None:
        return
    with _WARMED_LOCK:
        if (path, run) in _WARMED:
            return
        _WARMED.add((path, run))

    def work() -> None:
        # Any failure shows on the page that needs the model, with its message; not here.
        with contextlib.suppress(Exception):
            if run is not None:
                seconds = warm_up(path, run)
                print(f"{READY_MARK} {run!r} ({seconds:.1f} s)", file=sys.stderr, flush=True)

    thread = threading.Thread(target=work, name="saewb-warm-up", daemon=True)
    _WARM_THREADS.append(thread)
    thread.start()


def _join_warm_ups(timeout_s: float = 120.0) -> None:
    """At exit, let a running warm-up finish: a daemon thread killed inside torch or XLA aborts
    the interpreter (exit status 134), e.g. a short pytest run that opened the Runs page."""
    for thread in _WARM_THREADS:
        thread.join(timeout_s)


atexit.register(_join_warm_ups)


def is_serving(url: str) -> bool:
    """True when the server at `url` answers Streamlit's health check."""
    with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
        return r.status == 200
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    """A `saewb app` server started by ``running_server``: its URL and everything it printed."""

    url: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def wait_for_output(self, text: str, timeout: float = 120.0) -> float:
        """Block until the server printed a line containing `text`; seconds waited."""
        t0 = time.monotonic()
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the app never printed {text!r}:\n{''.join(self.lines)}")
            time.sleep(0.05)
        return time.monotonic() - t0


@contextlib.contextmanager
def running_server(
    workspace: str | Path, port: int | None = None, timeout: float = 120.0
) -> Iterator[RunningServer]:
    """Start the real server (the command `saewb app` runs) on a free localhost port, wait for health."""
    from app.cli import command, environment

    port = port or free_port()
    proc = subprocess.Popen(
        command(workspace, port),
        env=environment(workspace),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = RunningServer(f"http://localhost:{port}", proc)

    def drain() -> None:  # keep the pipe empty so the server never blocks on its own output
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not is_serving(server.url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the app did not start:\n{''.join(server.lines)}")
        time.sleep(0.2)
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    from streamlit.web import cli as streamlit_cli

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    path = os.environ.get("SAEWB_WORKSPACE")
    if path:
        # in a thread: reading the workspace must not delay the server's start
        threading.Thread(target=start_warm_up, args=(path,), daemon=True).start()
    sys.argv = ["streamlit", "run", str(MAIN), *(sys.argv[1:] if argv is None else argv)]
    try:
        streamlit_cli.main()
    except SystemExit as done:
        _leave_if_warming(done.code if isinstance(done.code, int) else int(done.code is not None))
        raise
    _leave_if_warming(0)


def _leave_if_warming(code: int) -> None:
    """Once the server has stopped (SIGTERM, SIGINT), exit now even if a warm-up is still loading.

    Waiting for it (_join_warm_ups) held the exit 10 s on the demo workspace, past a supervisor's
    patience; leaving without the interpreter's finalisation avoids its abort inside torch or XLA."""
    if any(t.is_alive() for t in _WARM_THREADS):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
