"""The documentation site, built strictly and looked at in a real browser.

The site is built with `mkdocs build --strict` (a broken link or
reference fails it), served on localhost, and opened in headless Chromium
(Debian's `chromium`, driven by Playwright): the home page, a guide and the
API page of `FlaxLayer` load without console errors, and the search box
finds `load_safetensors`. Screenshots are written under `build/screenshots/`
(or `$SCREENSHOTS`), which CI keeps. Needs the docs extra
(`pip install -e ".[docs]"`) and Chromium; CI's jax lane installs both.
"""

import functools
import http.server
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.site]

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHOTS = pathlib.Path(
    os.environ.get("SCREENSHOTS", ROOT / "build" / "screenshots")
)
PAGES = {
    "home": ("", "keras-flax"),
    "guide-linen": ("guides/linen/", "Linen modules"),
    "api-FlaxLayer": ("api/FlaxLayer/", "FlaxLayer"),
}
# Chromium as the project's CI starts it, with a fresh profile.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site, served on localhost: its address."""
    folder = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", folder],
        cwd=ROOT,
        check=True,
    )
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(folder)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def browser_page(tmp_path):
    """A page of headless Chromium with a fresh profile, and the console
    errors it reports."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the site test needs Chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "profile"),
            executable_path=chromium,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        errors = []
        page.on(
            "console",
            lambda message: (
                message.type == "error" and errors.append(message.text)
            ),
        )
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, errors
        context.close()


@pytest.mark.parametrize("name", PAGES)
def test_page_opens_without_console_errors(site, browser_page, name):
    page, errors = browser_page
    path, heading = PAGES[name]
    page.goto(site + path, wait_until="networkidle")
    assert heading in page.inner_text("article h1")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    assert errors == []


def test_search_finds_load_safetensors(site, browser_page):
    page, errors = browser_page
    page.goto(site, wait_until="networkidle")
    search = page.locator("input[data-md-component=search-query]")
    search.click()
    search.press_sequentially("load_safetensors", delay=20)
    result = page.wait_for_selector(".md-search-result__item")
    assert result is not None
    assert "load_safetensors" in page.inner_text(".md-search-result")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "search.png"))
    assert errors == []


def _charts():
    """`benchmarks/charts.py`, imported from its folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "charts", ROOT / "benchmarks" / "charts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_charts_are_drawn_from_the_newest_results(tmp_path, monkeypatch):
    charts = _charts()
    monkeypatch.setattr(charts, "CHARTS", str(tmp_path))
    drawn = [path for kind in charts.TITLES for path in charts.draw(kind)]
    names = sorted(pathlib.Path(path).name for path in drawn)
    assert names == ["build.svg", "memory.svg", "serving.svg", "steps.svg"]
    performance = (ROOT / "docs" / "performance.md").read_text()
    for name in names:
        assert f"(performance/{name})" in performance
        assert (ROOT / "docs" / "performance" / name).exists()
    # Each chart names the results file it was drawn from.
    steps = (tmp_path / "steps.svg").read_text()
    assert pathlib.Path(charts.newest("steps")).name in steps


def test_chart_data_are_the_tables():
    charts = _charts()
    path = charts.newest("steps")
    ratios = charts.step_ratios(path)
    for row in charts.table_with(path, "B8/A"):
        workload = row["workload"].split()[0]
        printed = float(row["B8/A"])
        assert ratios[workload]["keras_flax.FlaxLayer"] == pytest.approx(
            printed, abs=0.006
        )
    memory = charts.memory_ratios(charts.newest("memory"))
    assert memory["W1"]["after build, keras_flax"] == 1.0
