"""A real browser (Debian's chromium driven by Playwright): a report.html opened offline with every plot rendered, and
(opt-in, CALIBRL_BROWSER_NOTEBOOK=1) notebook 02 in JupyterLab with the slope slider moved by keyboard.

Skips with the reason when chromium or playwright is missing locally; under CI (CI set) they must be present
(.ci/run installs them), so there it fails instead of skipping. Never downloads a browser (`playwright install`
is not used): the system chromium is launched by path."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CALIBRL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]
SHOTS = Path(os.environ.get("CALIBRL_SCREENSHOTS", ROOT / ".pytest-screenshots"))


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright for Python is not installed (pip install playwright; .ci/run installs it)"
    else:
        if Path(CHROMIUM).is_file():
            return sync_playwright
        reason = f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(tmp_path: Path) -> list[Path]:
    from calibrl.history import History
    from calibrl.report import PANELS

    metrics = {m for _, _, ms, _ in PANELS for m, _, _ in ms}
    dirs = []
    for mode in ("grpo", "calibrl"):
        h = History.create(tmp_path / f"{mode}-s0", {"seed": 0, "steps": 3, "loss": {"mode": mode}})
        for step in (1, 2, 3):
            h.append({"step": step, "mode": mode, "seed": 0,
                      **{m: 0.1 * step + (0.05 if mode == "calibrl" else 0.0) for m in metrics}})
        dirs.append(h.run_dir)
    return dirs


def test_report_opens_offline_with_every_plot(tmp_path):
    sync_playwright = _browser_or_skip()
    from calibrl.report import write_report

    report = write_report(_history(tmp_path), tmp_path / "report.html")
    n_figs = report.read_text().count('class="plotly-graph-div"')
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})

        def route(r):
            if r.request.url.startswith("file://"):
                return r.continue_()
            outside.append(r.request.url)
            return r.abort()

        page.route("**/*", route)
        page.goto(report.as_uri())
        page.wait_for_function(f"document.querySelectorAll('.plotly-graph-div .main-svg').length >= {n_figs}",
                               timeout=60_000)
        drawn = page.evaluate("[...document.querySelectorAll('.plotly-graph-div')].map(d => "
                              "(d._fullData || []).filter(t => t.visible !== false).length)")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
        browser.close()
    assert not outside, f"the report requested outside resources: {outside}"
    assert n_figs >= 10 and len(drawn) == n_figs and all(k > 0 for k in drawn), drawn


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CALIBRL_BROWSER_NOTEBOOK"),
                    reason="opt-in (CALIBRL_BROWSER_NOTEBOOK=1): not yet reliable, the slider handle is not always "
                           "found in JupyterLab 4's DOM after Run All (issue 11); 3-6 min on a loaded 2-core machine")
def test_notebook_02_slope_slider_in_jupyterlab(tmp_path):
    sync_playwright = _browser_or_skip()
    port = _free_port()
    env = {**os.environ, "CALIBRL_FAST": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    work = tmp_path / "nb"
    work.mkdir()
    settings = tmp_path / "lab-settings"  # render every cell (no windowing) and ask no news question
    for ext, name, body in (("notebook-extension", "tracker", {"windowingMode": "none"}),
                            ("apputils-extension", "notification", {"fetchNews": "false"})):
        (settings / "@jupyterlab" / ext).mkdir(parents=True, exist_ok=True)
        (settings / "@jupyterlab" / ext / f"{name}.jupyterlab-settings").write_text(json.dumps(body))
    shutil.copy(ROOT / "notebooks" / "02_calibrl_loss.ipynb", work)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={work}", "--LabApp.news_url=", f"--LabApp.user_settings_dir={settings}",
         "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start: " + server.stderr.read1(4000).decode(errors="replace"))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(f"{base}/lab/tree/02_calibrl_loss.ipynb")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_selector("text=/ipykernel\\) \\| Idle/", timeout=180_000)  # kernel started and idle
            SHOTS.mkdir(parents=True, exist_ok=True)
            for _ in range(3):  # Run > Run All Cells, until the first code cell has run
                page.click(".lm-MenuBar-item:has-text('Run')", timeout=30_000)
                page.click(".lm-Menu-item:has-text('Run All Cells')", timeout=30_000)
                try:
                    page.wait_for_selector(".jp-InputPrompt:has-text('[1]')", timeout=30_000)
                    break
                except Exception:
                    page.keyboard.press("Escape")
            page.wait_for_selector("text=Exercise 2: correct", timeout=240_000)  # the last cell ran
            slider = page.locator(".widget-slider:has-text('slope α')").first
            handle, readout = slider.locator(".noUi-handle").first, slider.locator(".widget-readout").first
            # every plot's traces as [type, y, z]; the weights heatmap's z depends on the slope
            read = ("() => JSON.stringify([...document.querySelectorAll('.js-plotly-plot')].map(d => "
                    "(d.data || []).map(t => [t.type, t.y || null, t.z || null])))")
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3", timeout=120_000)
            slider.scroll_into_view_if_needed()
            time.sleep(1.0)
            start_value, before = readout.inner_text(), page.evaluate(read)
            handle.focus()  # keyboard: the focused handle takes arrow keys, like a user tabbing to it
            for _ in range(4):
                page.keyboard.press("ArrowRight")
            try:
                page.wait_for_function(f"({read})() !== {json.dumps(before)}", timeout=90_000)
            finally:
                time.sleep(1.0)
                page.locator(".widget-vbox:has(.widget-slider) .js-plotly-plot").nth(1).scroll_into_view_if_needed()
                page.screenshot(path=str(SHOTS / "notebook02-slider.png"), full_page=False)
            assert readout.inner_text() != start_value
            after = page.evaluate(read)
            browser.close()
        heat_before = [t[2] for fig in json.loads(before) for t in fig if t[0] == "heatmap" and t[2]]
        heat_after = [t[2] for fig in json.loads(after) for t in fig if t[0] == "heatmap" and t[2]]
        assert heat_before and len(heat_before) == len(heat_after), "the weight heatmaps were not read from the DOM"
        assert heat_before != heat_after, "moving the slope slider did not change the weights heatmap"
    finally:
        server.terminate()
        server.wait(timeout=30)
