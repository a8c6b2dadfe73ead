"""`saewb app`: serve the feature browser on localhost."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app",
        help="serve the Streamlit feature browser for a workspace",
        description="Serve the feature browser (runs, features, dashboards, text inspector, interventions).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("workspace", help="workspace file, e.g. workspace.duckdb")
    p.add_argument("--port", type=int, default=8501, help="port to serve on")
    p.add_argument(
        "--host",
        default="localhost",
        help="address to bind; the default keeps the app private to this machine",
    )
    p.add_argument("--open-browser", action="store_true", help="open a browser tab (off: headless server)")
    p.set_defaults(func=_serve)


def command(
    workspace: str | Path, port: int = 8501, host: str = "localhost", headless: bool = True
) -> list[str]:
    """The streamlit command line that serves the app (tests start the same one)."""
    return [
        sys.executable,
        "-m",
        "app.serve",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        str(headless).lower(),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        # the header keeps Streamlit's menu but not its Deploy button: a local research tool deploys nowhere
        "--client.toolbarMode",
        "viewer",
    ]


def environment(workspace: str | Path) -> dict[str, str]:
    return {
        **os.environ,
        "SAEWB_WORKSPACE": str(Path(workspace).resolve()),
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }


def _serve(args: argparse.Namespace) -> int:
    if not Path(args.workspace).exists():  # a mistyped path must not look like an empty workspace
        raise FileNotFoundError(
            f"workspace {args.workspace} does not exist; create it with "
            f"`saewb harvest --workspace {args.workspace} ...`, or check the path"
        )
    print(f"serving {args.workspace} at http://{args.host}:{args.port}", flush=True)
    sys.stderr.flush()
    # This process becomes the server (same PID): SIGTERM, SIGINT or SIGHUP sent to `saewb app` reach the
    # server itself, so nothing is left serving the port after a supervisor or `kill` stops it.
    argv = command(args.workspace, args.port, args.host, not args.open_browser)
    os.execve(argv[0], argv, environment(args.workspace))
