"""JupyterLab as a reading group uses it, in a real browser: `kclub lab` on a free port with a
token, a lab opened by its URL, Run All, and every cell's output read off the page.

Debian's chromium driven by PyPI's playwright (`executable_path`: playwright cannot download its
own browsers here); `make setup` installs chromium where it can. A planted failing notebook
proves the error check can fail."""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import sync_playwright

from shared.cli import lab_server_argv
from shared.parallel.launch import free_port
from shared.paths import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# chromium as root in a container, on a machine whose network is closed: no sandbox, no GPU, no
# background connections (each refused connection would otherwise be retried)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAB = "online-softmax"                    # the quickest lab: about 20 s at KC_SCALE=ci
KNOWN_OUTPUT = "at the HBM roof its minimal-traffic GB/s"   # printed by its last code cell
TOKEN = "kc-browser-test"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert os.path.exists(CHROMIUM), "no chromium: `make setup` installs Debian's (as root)"
    port = free_port()
    # JupyterLab 4 renders only the cells in view; the test reads every cell off the page
    settings = tmp_path_factory.mktemp("jupyterlab-settings")
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none",    # and start the notebook's
                                   "autoStartDefaultKernel": True}))   # kernel, no dialog
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))          # no pop-up over the page
    env = {**os.environ, "JUPYTER_TOKEN": TOKEN, "KC_SCALE": "ci",
           "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path_factory.mktemp("workspaces")),
           "JUPYTER_RUNTIME_DIR": str(tmp_path_factory.mktemp("jupyter-runtime"))}
    proc = subprocess.Popen(lab_server_argv(port), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if _get(f"{base}/api/status?token={TOKEN}")[0] == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None, "jupyter lab exited"
        assert time.monotonic() < deadline, "jupyter lab did not start in 60 s"
        time.sleep(0.5)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_the_server_wants_its_token_and_serves_the_repository(server):
    assert _get(f"{server}/api/contents/labs/{LAB}.ipynb")[0] == 403      # no token
    assert _get(f"{server}/api/contents/labs/{LAB}.ipynb?token=wrong")[0] == 403
    status, body = _get(f"{server}/api/contents/labs/{LAB}.ipynb?token={TOKEN}&content=0")
    assert status == 200 and json.loads(body)["type"] == "notebook"
    status, body = _get(f"{server}/api/contents/papers?token={TOKEN}")    # ../papers/ links
    assert status == 200 and json.loads(body)["type"] == "directory"
    status, body = _get(f"{server}/api/kernelspecs?token={TOKEN}")
    assert status == 200 and "kernel-club" in json.loads(body)["kernelspecs"]


ACTIVE = ".jp-NotebookPanel:not(.lm-mod-hidden)"     # the notebook in front


def run_all_in_browser(base: str, path: str, timeout_s: float) -> list[str]:
    """Open `path` in JupyterLab (a fresh workspace: ?reset), Run > Run All Cells, wait until
    every code cell has run or the run stopped at an error, and return the output areas' text."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{base}/lab/tree/{path}?reset&token={TOKEN}")
            page.wait_for_selector(f"{ACTIVE} .jp-CodeCell", timeout=60_000)
            # the status bar names the kernel once it is up: the project's, idle
            page.wait_for_selector(".jp-StatusBar-Widget:has-text('Kernel Club (.venv) | Idle')",
                                   timeout=60_000)
            page.click("li.lm-MenuBar-item:has-text('Run')")
            page.click("li.lm-Menu-item:has-text('Run All Cells')")
            # done: no prompt queued or running ([*]) and the first code cell has run
            page.wait_for_function(
                """(active) => { const ps = [...document.querySelectorAll(
                                   active + ' .jp-CodeCell .jp-InputPrompt')]
                                   .map(e => e.textContent);
                                 return ps.length > 0 && /\\d/.test(ps[0])
                                        && ps.every(t => !t.includes('*')); }""",
                arg=ACTIVE, timeout=timeout_s * 1000, polling=500)
            return page.locator(f"{ACTIVE} .jp-OutputArea-output").all_inner_texts()
        finally:
            browser.close()


def has_error(outputs: list[str]) -> bool:
    return any("Traceback" in text for text in outputs)


def test_a_lab_runs_in_the_browser(server):
    outputs = run_all_in_browser(server, f"labs/{LAB}.ipynb", timeout_s=240)
    assert not has_error(outputs), [t for t in outputs if "Traceback" in t][0][:2000]
    assert any(KNOWN_OUTPUT in text for text in outputs)


def test_a_failing_cell_is_seen(server):
    """The check above can fail: a notebook with a failing assert shows its traceback."""
    planted = ROOT / "build" / "browser-test" / "planted.ipynb"
    planted.parent.mkdir(parents=True, exist_ok=True)
    cells = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": src} for src in ("x = 6 * 7\nprint('first cell ran')", "assert x == 41")]
    planted.write_text(json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5,
                                   "metadata": {"kernelspec": {"name": "kernel-club",
                                                               "display_name": "Kernel Club",
                                                               "language": "python"}}}))
    outputs = run_all_in_browser(server, "build/browser-test/planted.ipynb", timeout_s=60)
    assert any("first cell ran" in t for t in outputs) and has_error(outputs)
