"""The real app in a real browser: Streamlit server on a free port, Debian's Chromium via Playwright."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import REPO, SAEWB

from app.serve import READY_MARK, free_port, is_serving, running_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server(demo_ws: Path) -> Iterator[str]:
    with running_server(demo_ws) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is missing: `make test` installs it (apt-get install chromium chromium-driver)"
        )
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
    # Every page opened from its own URL, as a bookmark or a shared link would: its title, its last section.
    for path, title, last in [
        ("runs?run=demo", "Runs", "Training curves: demo"),
        ("features?run=demo", "Features", "latents"),
        ("feature?run=demo&latent=3", "Latent 3", "Family"),
        ("inspector?run=demo", "Text inspector", "Strongest latents"),
        ("interventions?run=demo", "Interventions", "Candidate texts"),
    ]:
        page.goto(f"{server}/{path}")
        page.get_by_text(last).first.wait_for()  # the page's last section: everything above has rendered
        page.wait_for_timeout(2000)  # charts and grids draw after their data arrives
        assert page.locator("h1").first.inner_text() == title, path
        assert page.url.startswith(f"{server}/{path}"), (path, page.url)  # no fallback to another page
        assert page.locator("[data-testid='stException']").count() == 0, path
        assert page.get_by_text("Page not found").count() == 0, path
        # the header holds this app's menu only: no Streamlit Deploy button
        assert page.get_by_role("button", name="Deploy").count() == 0, path
        assert page.locator("[data-testid='stAppDeployButton']").count() == 0, path
        page.screenshot(path=str(ARTIFACTS / f"page-{path.split('?')[0]}.png"), full_page=True)

    # The root URL opens the Runs page at its own URL, keeping the query.
    page.goto(f"{server}/?run=demo")
    page.wait_for_url("**/runs?run=demo")
    page.get_by_text("Training curves: demo").first.wait_for()
    assert page.get_by_text("Page not found").count() == 0

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


def test_server_warms_the_model_before_the_first_visit(demo_ws: Path, browser: object) -> None:
    """The server loads the newest run's model and SAE at start, so the first inspector visit is fast."""
    with running_server(demo_ws) as srv:
        srv.wait_for_output(READY_MARK)
        page = browser.new_page()  # type: ignore[attr-defined]
        page.set_default_timeout(60_000)
        page.goto(f"{srv.url}/inspector?run=demo")
        page.get_by_text("Strongest latents").first.wait_for()
        assert page.locator("[data-testid='stException']").count() == 0
        page.close()
        # the page found the model in the server's cache: it never loaded the weights a second time
        assert "".join(srv.lines).count("saewb app: loading model") == 1, "".join(srv.lines)


def test_intervention_page_steers_tiny_lm_generation(tiny_lm_ws: Path, browser: object) -> None:
    """A causal LM in the browser: steering one latent of the tiny-lm run changes the generated text."""
    from analysis import tables

    stats = tables.latent_summary(tiny_lm_ws, "lm")
    latent = max(stats, key=lambda s: s["n_fires"])["latent"]
    with running_server(tiny_lm_ws) as srv:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
        page.set_default_timeout(120_000)
        page.goto(f"{srv.url}/interventions?run=lm&latents={latent}&edit=steer&coeff=40&tokens=12")
        page.get_by_role("button", name="Run").click()
        page.get_by_text("largest logit change").wait_for()
        assert page.locator("[data-testid='stException']").count() == 0
        clean, edited = (page.locator("[data-testid='stCode']").nth(i).inner_text() for i in (0, 1))
        assert clean.startswith("def parse(text):") and edited.startswith("def parse(text):")
        assert clean != edited, clean
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "intervention-tiny-lm.png"), full_page=True)
        page.close()


def test_saewb_app_stops_its_server_on_sigterm(demo_ws: Path, tmp_path: Path) -> None:
    """A supervisor's SIGTERM to `saewb app` stops the server: the port is free and no process is left."""
    port = free_port()
    log = tmp_path / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*SAEWB, "app", str(demo_ws), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        deadline = time.monotonic() + 120
        while not is_serving(f"http://localhost:{port}"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)  # while the server still warms the model: the hardest moment to stop
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=5)
        assert alive == [], [p.cmdline() for p in alive]
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
