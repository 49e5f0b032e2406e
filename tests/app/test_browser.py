"""The app and the HTML report in a real browser: Debian's chromium driven by playwright.

Never a downloaded browser: chromium is launched from /usr/bin/chromium. The app is the one users start,
``streamlit run app`` from the repository root and the installed package's app folder from a project with
an ``app/`` and ``app.py`` of its own (``tests/app/conftest.py``), bound to 127.0.0.1 on a free port and
always stopped. Screenshots are kept under the test's tmp dir.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.app.conftest import USER_MARKER, Served

CHROMIUM = Path("/usr/bin/chromium")
#: How long a wait for something on the page may take before the test fails: each wait returns as soon as
#: its element or condition is there, so only a page that never draws costs this, not a loaded machine.
WAIT_MS = 120_000
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


def launch(play):
    return play.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)


def first_view(served: Served, screenshot: Path) -> str:
    """Open the app, wait for the first view's chart and for the script to finish; the page's text."""
    with playwright_api.sync_playwright() as play:
        browser = launch(play)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served.server.url, wait_until="domcontentloaded")
            page.wait_for_selector("[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg", timeout=WAIT_MS)
            # Streamlit marks the app as running while the script runs; wait until it is done.
            page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=WAIT_MS)
            assert page.locator("[data-testid='stVegaLiteChart']").count() >= 1
            assert page.locator("[data-testid='stException']").count() == 0
            assert not errors, errors
            page.screenshot(path=str(screenshot), full_page=True)
            text = page.inner_text("body")
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    return text


def check_first_view(served: Served, text: str) -> None:
    assert "GradNorm runs" in text
    # the page names the root it shows and why
    assert f"Runs root: {served.runs_root}" in text and served.reason in text, text[:500]
    assert "Traceback" not in text


def test_streamlit_run_app_draws_its_first_view_in_chromium(repo_app: Served, tmp_path: Path) -> None:
    check_first_view(repo_app, first_view(repo_app, tmp_path / "app.png"))


def test_the_installed_app_is_served_not_the_projects_own_app(scratch_app: Served, tmp_path: Path) -> None:
    text = first_view(scratch_app, tmp_path / "app.png")
    check_first_view(scratch_app, text)
    assert USER_MARKER not in text and USER_MARKER not in scratch_app.server.log()


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
            page.wait_for_selector("canvas, svg.marks", timeout=WAIT_MS)
            assert not errors, errors
            assert "toy-T2-gradnorm" in page.inner_text("body")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()


#: Names a part file or a run.json may carry; each must be drawn as text, never run or parsed as markup.
HOSTILE_NAMES = [
    "</script><script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=2;alert(2)">',
    "\"quoted' & <b>bold</b> --><!--",
    "\u202eevil\u202c rtl \u2028 line",
]


def test_a_report_on_hostile_names_runs_no_script_and_draws_them_as_text(tmp_path):
    import os
    import shutil

    from gradnorm.app.report import write_report
    from tests.helpers.synthetic_runs import run_json, write_run

    meta = run_json("hostile", tasks=HOSTILE_NAMES, balancer={"name": HOSTILE_NAMES[0]}, mode=HOSTILE_NAMES[1])
    write_run(tmp_path, "hostile", tasks=HOSTILE_NAMES, meta=meta)
    report = write_report(tmp_path, ["hostile"], tmp_path / "report.html")
    with playwright_api.sync_playwright() as play:
        browser = launch(play)
        try:
            page = browser.new_context(offline=True, viewport={"width": 1400, "height": 1000}).new_page()
            errors: list[str] = []
            dialogs: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(report.as_uri())
            page.wait_for_selector("#charts canvas, #charts svg.marks", timeout=WAIT_MS)
            page.wait_for_timeout(500)  # any injected handler (img onerror) would have run by now
            assert page.evaluate("() => window.__pwned") is None
            assert dialogs == [] and errors == []
            counts = page.evaluate(
                "() => ({scripts: document.scripts.length, img: document.images.length, b: document.getElementsByTagName('b').length,"
                " handlers: document.querySelectorAll('[onerror]').length})"
            )
            assert counts == {"scripts": 3, "img": 0, "b": 0, "handlers": 0}
            text = page.inner_text("body")
            for name in HOSTILE_NAMES[:3]:
                assert name in text  # the summary table shows each name as it is
            screenshot = tmp_path / "hostile-report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    keep = os.environ.get("GRADNORM_KEEP_SCREENSHOTS")
    if keep:  # to look at the page by eye
        shutil.copy(screenshot, Path(keep) / screenshot.name)


# --------------------------------------------------------------------------------------------------------
# Every view at two window sizes: fits the window, legends, no Vega warning, state in the URL

VIEWS = ["Weights", "Compare runs", "Gradient norms & loss ratios", "Overfitting", "Balance", "Export weights"]
SIZES = [(1400, 900), (1000, 800)]
#: Screenshots to look at (and keep as CI artifacts); git-ignored.
RESULTS = Path(__file__).resolve().parent / "results" / "screenshots"
CHART = "[data-testid='stVegaLiteChart']"
#: A chart drawn: Streamlit has Vega draw small datasets as SVG, larger ones on a canvas.
DRAWN = f"{CHART} canvas, {CHART} svg"


def _chart_specs(payload) -> list[dict]:
    """The Vega-Lite specs in one websocket frame from the server (a ForwardMsg): what the browser drew."""
    import json

    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    if isinstance(payload, str):
        return []
    message = ForwardMsg()
    try:
        message.ParseFromString(payload)
    except Exception:  # (not a ForwardMsg: nothing to check)
        return []
    if message.WhichOneof("type") != "delta" or message.delta.WhichOneof("type") != "new_element":
        return []
    element = message.delta.new_element
    return [json.loads(element.vega_lite_chart.spec)] if element.WhichOneof("type") == "vega_lite_chart" else []


def _settled(page) -> None:
    """Wait until the script has finished and every chart on the page has drawn."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=WAIT_MS)
    page.wait_for_function(
        f"() => [...document.querySelectorAll(\"{CHART}\")].every(c => c.querySelector('canvas, svg'))",
        timeout=WAIT_MS,
    )
    page.wait_for_timeout(300)


def _rights(page) -> list[float]:
    return page.evaluate(
        f"() => [...document.querySelectorAll(\"{CHART}\")].flatMap(c => [c, ...c.querySelectorAll('canvas, svg')]).map(e => e.getBoundingClientRect().right)"
    )


def _layers(spec: dict) -> list[dict]:
    return [spec, *[layer for layer in spec.get("layer", []) for layer in _layers(layer)]]


def _series_channels(spec: dict) -> list[tuple[str, object]]:
    """(channel, legend) of every colour or dash channel of a chart that maps a field (several series)."""
    found = []
    for layer in _layers(spec):
        for channel in ("color", "strokeDash"):
            encoding = layer.get("encoding", {}).get(channel)
            if isinstance(encoding, dict) and "field" in encoding:
                found.append((channel, encoding.get("legend", "default")))
    return found


def test_every_view_fits_the_window_has_legends_and_draws_without_vega_warnings(repo_app: Served) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    console: list[tuple[str, str]] = []
    specs: list[dict] = []
    with playwright_api.sync_playwright() as play:
        browser = launch(play)
        try:
            for width, height in SIZES:
                page = browser.new_page(viewport={"width": width, "height": height})
                page.on("console", lambda message: console.append((message.type, message.text)))
                page.on("websocket", lambda socket: socket.on("framereceived", lambda payload: specs.extend(_chart_specs(payload))))
                page.goto(repo_app.server.url, wait_until="domcontentloaded")
                page.wait_for_selector(DRAWN, timeout=WAIT_MS)
                for view in VIEWS:
                    page.locator("[data-testid='stMainBlockContainer'] label").filter(has_text=view).first.click()
                    if view != VIEWS[0]:  # the script of the new view has started (it writes the URL) before the page settles
                        page.wait_for_url(lambda address, view=view: urlencode({"view": view}) in address, timeout=WAIT_MS)
                    if view != "Export weights":  # and has drawn a chart: on a loaded machine the page may settle in between
                        page.wait_for_function(
                            f'() => !document.querySelector(\'[data-testid="stStatusWidget"]\') && document.querySelectorAll("{CHART}").length >= 1',
                            timeout=WAIT_MS,
                        )
                    _settled(page)
                    if view != "Export weights":
                        assert page.locator(CHART).count() >= 1, view
                    page.screenshot(path=str(RESULTS / f"{view.split()[0].lower()}-{width}x{height}.png"))
                    viewport = page.evaluate("() => document.documentElement.clientWidth")
                    assert max(_rights(page), default=0) <= viewport, (view, width, _rights(page))
                    assert page.locator("[data-testid='stException']").count() == 0, view
                page.close()
        finally:
            browser.close()
    vega = [text for kind, text in console if kind in ("warning", "error") and ("WARN" in text or "vega" in text.lower())]
    assert not vega, vega
    assert len(specs) >= 10  # every chart of every view (a second session may get them from the message cache)
    for spec in specs:
        for channel, legend in _series_channels(spec):
            assert legend is not None, (channel, spec.get("title"))


def test_a_reload_with_the_url_restores_the_view(repo_app: Served) -> None:
    with playwright_api.sync_playwright() as play:
        browser = launch(play)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{repo_app.server.url}/?run=toy-T2-equal&run=toy-T2-gradnorm&view=Balance&log=1", wait_until="domcontentloaded")
            page.wait_for_selector(DRAWN, timeout=WAIT_MS)
            _settled(page)
            page.locator("[data-testid='stMainBlockContainer'] label").filter(has_text="Compare runs").first.click()
            # the new view's script has started (it writes the URL) before the page counts as settled: on a loaded
            # machine it may start after _settled's first look, which would then see the old view
            page.wait_for_url(lambda address: urlencode({"view": "Compare runs"}) in address, timeout=WAIT_MS)
            _settled(page)
            assert "view=Compare+runs" in page.url or "view=Compare%20runs" in page.url, page.url
            shown = page.url
            page.reload(wait_until="domcontentloaded")
            page.wait_for_selector(DRAWN, timeout=WAIT_MS)
            _settled(page)
            checked = page.evaluate(
                "() => [...document.querySelectorAll('[data-testid=stMainBlockContainer] [role=radiogroup] input:checked')]"
                ".map(i => i.closest('label').innerText.trim())"
            )
            assert "Compare runs" in checked, checked
            text = page.inner_text("[data-testid='stSidebar']")
            assert "toy-T2-equal" in text and "toy-T2-gradnorm" in text and "toy-T10-gradnorm" not in text
            assert page.locator("[data-testid='stSidebar'] input[type=checkbox]").first.is_checked()  # log scale
            assert page.url == shown
        finally:
            browser.close()


def _drawn_strokes(page) -> list[str]:
    """The stroke colours of the lines the first chart drew (Vega draws these small datasets as SVG)."""
    return page.evaluate(
        f"() => [...new Set([...document.querySelector(\"{CHART}\").querySelectorAll('svg path, svg line')]"
        ".map(e => e.getAttribute('stroke')).filter(s => s && s.startsWith('#')))]"
    )


def test_the_dark_theme_draws_the_runs_in_the_same_colours_as_the_light_one(repo_app: Served) -> None:
    """Streamlit's dark theme (embed_options=dark_theme, the same as theme.base = "dark"): the Balance view's
    run colours are the explicit palette in both themes, and the page behind them is dark."""
    from gradnorm.app import _charts as charts

    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = "&".join(f"run={r}" for r in ("toy-T10-equal", "toy-T10-gradnorm", "toy-T10-static-converged"))
    console: list[tuple[str, str]] = []
    drawn: dict[str, tuple[list[str], str]] = {}
    with playwright_api.sync_playwright() as play:
        browser = launch(play)
        try:
            for theme, options in (("light", ""), ("dark", "&embed_options=dark_theme")):
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.on("console", lambda message: console.append((message.type, message.text)))
                page.goto(f"{repo_app.server.url}/?embed=true{options}&view=Balance&{runs}", wait_until="domcontentloaded")
                page.wait_for_selector(DRAWN, timeout=WAIT_MS)
                _settled(page)
                background = page.evaluate("() => getComputedStyle(document.querySelector('.stApp')).backgroundColor")
                drawn[theme] = (_drawn_strokes(page), background)
                page.locator(CHART).first.screenshot(path=str(RESULTS / f"balance-{theme}-chart.png"))
                page.close()
        finally:
            browser.close()
    (light, light_background), (dark, dark_background) = drawn["light"], drawn["dark"]

    def luminance(rgb: str) -> float:
        red, green, blue = (int(v) for v in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3])
        return 0.2126 * red + 0.7152 * green + 0.0722 * blue

    assert luminance(dark_background) < 60 < 200 < luminance(light_background), (dark_background, light_background)
    runs_drawn = [colour for colour in light if colour in charts.RUN_COLOURS]
    assert runs_drawn == charts.RUN_COLOURS[:3]  # one colour per run, the palette's first three, in order
    assert [colour for colour in dark if colour in charts.RUN_COLOURS] == runs_drawn
    vega = [text for kind, text in console if kind in ("warning", "error") and ("WARN" in text or "vega" in text.lower())]
    assert not vega, vega
