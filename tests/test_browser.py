"""A generated report.html and index.html, as headless Chromium renders them: every image loaded,
no console errors, nothing wider than the page.

    .venv/bin/python -m pytest -q tests/test_browser.py

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them where it can; ``make`` does not) and
selenium (the test extra); skipped with the reason where either is absent.
"""

from __future__ import annotations

import shutil
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchnorm.lab import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1000,800",
)  # fmt: skip


def _figures(results: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    from batchnorm.lab.figures import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot([1, 10, 100], [1.0, 0.1, 0.01], label="BN")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_ylabel("training loss (a long label)")
    a.legend()
    b.bar(["BN", "plain"], [0.96, 0.93])
    b.set_ylabel("test accuracy")
    yield "curves.png", fig


def _results(eid: str) -> dict[str, Any]:
    return {
        "id": eid,
        "description": "a synthetic experiment with a long description " * 3,
        "run": {"mode": "tiny", "seed": 0, "data": "digits"},
        "config": {
            "arms": [{"name": "BN", "lr": 0.1, "note": "x" * 300}],
            "a_very_long_setting_name_without_spaces_" * 3: 1,
        },
        "data": {"name": "digits"},
        "metrics": {},
        "versions": {"platform": "Linux-" + "x" * 200},
        "claims": [{"claim": "BN helps " * 20, "holds": True, "evidence": "loss " + "0.1, " * 60}],
        "wall_time_s": 1.0,
    }


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(
            "headless Chromium is not installed (Debian, as root: apt-get install -y chromium chromium-driver; .ci/run does it)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="batchnorm-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    module = types.SimpleNamespace(figures=_figures, EXPLANATION="What.\n\nWhy.")
    for eid in ("demo-a", "demo-b"):
        report.write_experiment_report(out / eid, _results(eid), module)  # type: ignore[arg-type]
    report.write_index(out, [_results("demo-a"), _results("demo-b")])
    return {"report": out / "demo-a" / "report.html", "index": out / "index.html"}


@pytest.mark.parametrize("page", ["report", "index"])
def test_page_renders_cleanly(browser: Any, pages: dict[str, Path], page: str) -> None:
    browser.get(pages[page].as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.getBoundingClientRect().right]);"
    )
    if page == "report":
        assert images, "the report shows no figure"
    for alt, complete, width, _ in images:
        assert complete and width > 0, f"image {alt!r} did not load"
    errors = [entry for entry in browser.get_log("browser") if entry.get("level") == "SEVERE"]
    assert errors == []
    scroll_width, inner_width = browser.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth];"
    )
    assert scroll_width <= inner_width, f"the page is {scroll_width} px wide in a {inner_width} px window"
    if page == "index":
        links = browser.execute_script("return Array.from(document.links).map(a => a.href);")
        assert any(link.endswith("demo-a/report.html") for link in links)
