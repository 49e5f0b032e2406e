"""The app and the HTML report in a real browser: Debian's chromium driven by playwright.

Never a downloaded browser: chromium is launched from /usr/bin/chromium. The Streamlit server binds to
127.0.0.1 on a free port and is always stopped. Screenshots are kept under the test's tmp dir.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
APP = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    port = free_port()
    env = dict(os.environ, GRADNORM_RUNS_ROOT="", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    env.pop("GRADNORM_RUNS_ROOT")
    log = open(tmp_path / "streamlit.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(APP),
            "--server.address",
            "127.0.0.1",
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()}")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def launch(play):
    return play.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)


def test_the_app_renders_its_charts_in_chromium(app_url, tmp_path):
    with playwright_api.sync_playwright() as play:
        browser = launch(play)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(app_url, wait_until="domcontentloaded")
            page.wait_for_selector("[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg", timeout=60_000)
            # Streamlit marks the app as running while the script runs; wait until it is done.
            page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
            charts = page.locator("[data-testid='stVegaLiteChart']")
            assert charts.count() >= 1
            assert page.locator("[data-testid='stException']").count() == 0
            assert "GradNorm runs" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_the_report_opens_offline_and_draws(tmp_path):
    from gradnorm.app.report import write_report
    from gradnorm.toolkit.analysis import default_runs_root

    report = write_report(default_runs_root(), ["toy-T2-equal", "toy-T2-gradnorm"], tmp_path / "report.html")
    with playwright_api.sync_playwright() as play:
        browser = launch(play)
        try:
            context = browser.new_context(offline=True)  # the report must not need the network
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(report.as_uri())
            page.wait_for_selector("canvas, svg.marks", timeout=30_000)
            assert not errors, errors
            assert "toy-T2-gradnorm" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
