"""The real app in a real browser: Streamlit server on a free port, Debian's Chromium via Playwright."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.serve import READY_MARK, running_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def server(demo_ws: Path) -> Iterator[str]:
    with running_server(demo_ws) as srv:
        yield srv.url


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
