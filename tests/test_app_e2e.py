"""The real app in a real browser: Streamlit server on a free port, Debian's Chromium via Playwright."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.cli import command, environment

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(demo_ws: Path) -> Iterator[str]:
    with serving(demo_ws) as url:
        yield url


@contextmanager
def serving(ws: Path) -> Iterator[str]:
    """The real `saewb app` server command on a free localhost port."""
    demo_ws = ws
    port = _free_port()
    proc = subprocess.Popen(command(demo_ws, port), env=environment(demo_ws), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://localhost:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the app did not start:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield b
        b.close()


def test_server_binds_to_localhost_only(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    ips = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), port)} - {"127.0.0.1", "::1"}
    for ip in ips:  # the machine's other addresses must refuse the connection
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
            s.settimeout(2)
            assert s.connect_ex((ip, port)) != 0, f"app reachable on {ip}"


def test_pages_table_click_dashboard_and_intervention(server: str, browser: object) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    page.set_default_timeout(120_000)
    for path, last in [("", "Training curves"), ("features?run=demo", "latents"), ("feature?run=demo&latent=1", "Family"),
                       ("inspector?run=demo", "Strongest latents"), ("interventions?run=demo", "Candidate texts")]:
        page.goto(f"{server}/{path}")
        page.get_by_text(last).first.wait_for()  # the page's last section: everything above has rendered
        page.wait_for_timeout(2000)  # charts and grids draw after their data arrives
        assert page.locator("[data-testid='stException']").count() == 0, path
        assert page.get_by_text("Page not found").count() == 0, path
        page.screenshot(path=str(ARTIFACTS / f"page-{path.split('?')[0] or 'runs'}.png"), full_page=True)

    # From the latent table into a dashboard: select the first row of the table.
    page.goto(f"{server}/features?run=demo")
    grid = page.locator("[data-testid='stDataFrame']").last
    grid.wait_for()
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)  # the first data row's selection cell
    page.wait_for_url("**/feature?*", timeout=60_000)
    page.get_by_role("heading", name="Latent 0").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "dashboard-from-table.png"), full_page=True)

    # An intervention on the encoder: steering changes the semantic-search similarities.
    page.goto(f"{server}/interventions?run=demo&latents=3&edit=steer&coeff=20")
    page.get_by_role("button", name="Run").click()
    page.get_by_text("Semantic search, before and after the edit").wait_for()
    assert page.locator("[data-testid='stException']").count() == 0
    page.screenshot(path=str(ARTIFACTS / "intervention.png"), full_page=True)
    page.close()
