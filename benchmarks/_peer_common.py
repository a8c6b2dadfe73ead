"""Stdlib-only plumbing shared by the peer workers (they run inside the peer virtualenvs).

A speed worker builds its model once, then serves timing requests on stdin so the driver can
interleave repetitions of every implementation in one invocation (noise hits all of them alike):

    driver -> worker: ``rep <steps>``   worker -> driver: one JSON line ``{"seconds": ..., "steps": ...}``
    driver -> worker: ``quit``

Every line the driver must parse starts with ``@@`` so library chatter on stdout is ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

PREFIX = "@@"


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve_speed(step: Callable[[], None], info: dict[str, Any]) -> None:
    """Announce readiness, then time ``rep N`` requests until ``quit`` (or EOF)."""
    emit({"ready": True, **info})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "rep":
            n = int(cmd[1])
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            emit({"seconds": time.perf_counter() - t0, "steps": n})


def speed_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction, argparse.ArgumentParser]:
    """The workers' shared command line: (parser, its subcommands, the `speed` subcommand's parser)."""
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--d", type=int, default=384)
    s.add_argument("--n", type=int, default=16384)
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--batch", type=int, default=4096)
    s.add_argument("--warmup", type=int, default=2)
    return p, sub, s
