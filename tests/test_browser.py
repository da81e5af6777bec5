"""The notebooks as a reader runs them: Run > Run All Cells in JupyterLab, in headless Chromium driven by Playwright.
Scratch copies in the quick configuration, the walkthrough first. Each page must show every code cell numbered, no
error, every figure, every equation rendered by MathJax; a dragged latent slider must change the digit. On failure: a
screenshot and the server log. Chromium is Debian's; without it or Playwright: a skip, and under CI a failure."""

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import psutil
import pytest

from conftest import COMPANION, NOTEBOOK, QUICK_SETTINGS, REPO, data_root, prepare_notebook, require

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.notebook]

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# Debian's Chromium as root in a container: no sandbox, no GPU, none of its own background traffic, no proxy.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--no-proxy-server"]
LOCAL = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:")  # all the page may reach
PAGE_TIMEOUT, RUN_TIMEOUT = 90_000, 300_000  # milliseconds: page and kernel ready; Run All of one notebook
TEX = re.compile(r"\$[^$]+\$", re.DOTALL)  # TeX in a markdown source, outside `code spans`
CODE_SPAN = re.compile(r"`[^`]*`")
RAW_TEX = re.compile(r"\$\$|\\begin\{|\\frac|\\mathbb|\\mathcal|\\mathrm|\\mid|\\sum|\\log|\\underbrace")
# A figure a cell always shows: `plt.show()` or `display(Image(` at its top level (not under an `if` or a loop).
SHOWN_FIGURE = re.compile(r"^(?:plt\.show\(\)|display\(Image\()", re.MULTILINE)
# Private Jupyter folders, each named as the variable that points to it. Every cell stays in the page (no windowing),
# so nothing needs scrolling; no news, update checks, announcements or extension manager.
JUPYTER_DIRS = ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
                "JUPYTERLAB_WORKSPACES_DIR", "IPYTHONDIR")
JUPYTER_FILES = {"JUPYTER_CONFIG_DIR/labconfig/page_config.json": {"disabledExtensions": {
    "@jupyterlab/apputils-extension:announcements": True, "@jupyterlab/extensionmanager-extension": True}},
    "JUPYTERLAB_SETTINGS_DIR/@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "JUPYTERLAB_SETTINGS_DIR/@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False}}
# Per cell of the open notebook: its kind, prompt, error text, image widths and equations.
READ_NOTEBOOK = r"""() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')]
  .map((cell, index) => ({
    index,
    kind: cell.classList.contains('jp-CodeCell') ? 'code' : cell.classList.contains('jp-MarkdownCell') ? 'md' : 'raw',
    prompt: (cell.querySelector('.jp-InputPrompt')?.textContent || '').trim(),
    errors: [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map(el => el.innerText).filter(text => /Traceback|Error|Exception/.test(text)),
    images: [...cell.querySelectorAll('.jp-OutputArea-output img')].map(img => img.naturalWidth),
    math: cell.querySelectorAll('.jp-RenderedMarkdown mjx-container').length,
    mathErrors: cell.querySelectorAll('.jp-RenderedMarkdown mjx-merror, .jp-RenderedMarkdown [data-mjx-error]').length,
    markdown: cell.querySelector('.jp-RenderedMarkdown')?.innerText || '',
  }))"""
# The kernel is connected and idle: the toolbar's indicator and the status bar ("Python 3 (ipykernel) | Idle") agree.
KERNEL_IDLE = r"""
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const indicator = panel && panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const status = [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(item => item.textContent.trim());
  const idle = indicator && indicator.getAttribute('data-status') === 'idle'
    && status.some(text => / \| Idle$/.test(text) && !text.startsWith('No Kernel'));
"""
# Run All is over: idle, nothing queued, and every cell numbered or a traceback shown (Run All stops at an error).
RUN_FINISHED = "() => {" + KERNEL_IDLE + r"""
  if (!idle) return false;
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  if (prompts.length === 0 || prompts.some(p => p.includes('*'))) return false;
  return prompts.every(p => /\[\d+\]/.test(p)) || [...panel.querySelectorAll('.jp-OutputArea-output')]
    .some(el => /Traceback/.test(el.innerText));
}"""
# Settled: every image loaded, and the counts of outputs, equations and images unchanged for a second.
PAGE_SETTLED = r"""() => {
  const images = [...document.querySelectorAll('.jp-OutputArea-output img')];
  if (!images.every(img => img.complete)) return false;
  const signature = [document.querySelectorAll('.jp-OutputArea-output').length,
                     document.querySelectorAll('mjx-container').length, images.length].join();
  if (window.__settled?.signature !== signature) window.__settled = {signature, since: Date.now()};
  return Date.now() - window.__settled.since > 1000;
}"""


@pytest.fixture
def lab_server(tmp_path):
    """JupyterLab on 127.0.0.1 serving scratch copies, with private Jupyter folders and the quick configuration."""
    root, jupyter, out = tmp_path / "root", tmp_path / "jupyter", tmp_path / "out"
    root.mkdir()
    for path in (NOTEBOOK, COMPANION):  # the quick configuration as papermill's parameters cell, outputs cleared
        prepare_notebook(path, root / path.name, clear_outputs=True, **QUICK_SETTINGS, OUT_DIR=str(out),
                         DATA_DIR=str(data_root()))
    shutil.copy2(REPO / "vae_helpers.py", root)
    if (REPO / "results" / "sweep").is_dir():
        shutil.copytree(REPO / "results" / "sweep", root / "results" / "sweep")
    for name, values in JUPYTER_FILES.items():
        (jupyter / name).parent.mkdir(parents=True, exist_ok=True)
        (jupyter / name).write_text(json.dumps(values))
    env = dict(os.environ, **{name: str(jupyter / name) for name in JUPYTER_DIRS}, JUPYTER_PLATFORM_DIRS="1",
               PYTHONUNBUFFERED="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token, log, url = secrets.token_hex(24), tmp_path / "server.log", f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command + ["--allow-root"] * (os.geteuid() == 0), cwd=root, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        direct, deadline = urllib.request.build_opener(urllib.request.ProxyHandler({})), time.monotonic() + 60
        while True:  # `direct`: never through an http_proxy
            assert process.poll() is None, f"JupyterLab exited with {process.returncode}; log: {log}"
            with contextlib.suppress(OSError), direct.open(f"{url}/api/status?token={token}", timeout=2):
                break
            assert time.monotonic() < deadline, f"JupyterLab did not answer in 60 s; log: {log}"
            time.sleep(0.5)
        yield {"url": url, "token": token, "log": log, "root": root, "out": out}
    finally:  # stop the server, then every process it started that is still alive (its kernels)
        children = []
        with contextlib.suppress(psutil.Error):  # the server may have exited already
            children = psutil.Process(process.pid).children(recursive=True)
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
        process.kill()  # does nothing once it has exited
        process.wait()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()


@pytest.fixture
def page():
    """A page in headless Debian Chromium that can reach 127.0.0.1 only."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("Playwright is not installed (it is in requirements-dev.txt: `make dev`)", False)
    require(f"Chromium is not at {CHROMIUM} (Debian: `apt-get install chromium`)", os.access(CHROMIUM, os.X_OK))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                             chromium_sandbox=False)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(LOCAL)
                       else route.abort())
            yield page
        finally:
            browser.close()


def problems(cells, path):
    """What is wrong on the page: a cell not run or showing an error, a figure missing, an equation not rendered."""
    source = nbformat.read(path, as_version=4).cells
    code, markdown = [c for c in cells if c["kind"] == "code"], [c for c in cells if c["kind"] == "md"]
    tex = [bool(TEX.search(CODE_SPAN.sub("", c.source))) for c in source if c.cell_type == "markdown"]
    figures = sum(len(SHOWN_FIGURE.findall(c.source)) for c in source if c.cell_type == "code")
    found = [] if len(markdown) == len(tex) and code else [f"{len(code)} code, {len(markdown)} markdown cells shown"]
    for cell in code:
        name = f"cell {cell['index'] + 1} {cell['prompt']}"
        found += [f"{name} did not run"] * (not re.fullmatch(r"\[\d+\]:?", cell["prompt"]))
        found += [f"{name} shows an error:\n{error[-2000:]}" for error in cell["errors"][:1]]
        found += [f"a figure in {name} did not load"] * (0 in cell["images"])
    if (shown := sum(len(cell["images"]) for cell in code)) < figures:
        found.append(f"{shown} figures shown, expected at least {figures}")
    for cell, has_tex in zip(markdown, tex):
        name, raw = f"markdown cell {cell['index'] + 1}", RAW_TEX.search(cell["markdown"])
        found += [f"{name}: MathJax rendered none of its equations"] * (has_tex and not cell["math"])
        found += [f"{name}: MathJax shows an error"] * (cell["mathErrors"] > 0)
        if raw:
            found.append(f"{name} shows raw TeX: {cell['markdown'][max(raw.start() - 80, 0):raw.end() + 80]!r}")
    return found


def what_a_reader_sees(page, server, path):
    """Run All Cells in `path` (in the walkthrough, then drag the first slider): what is wrong, [] if nothing."""
    from playwright.sync_api import Error as PlaywrightError

    step = "opening it"
    try:
        page.goto(f"{server['url']}/lab/tree/{path.name}?reset&token={server['token']}", timeout=PAGE_TIMEOUT)
        step = "waiting for the kernel"
        page.wait_for_function("() => {" + KERNEL_IDLE + "return idle; }", timeout=PAGE_TIMEOUT, polling=250)
        step = "clicking Run > Run All Cells"
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        step = "waiting for Run All to finish"
        page.wait_for_function(RUN_FINISHED, timeout=RUN_TIMEOUT, polling=500)
        step = "waiting for the outputs and equations to settle"
        page.wait_for_function(PAGE_SETTLED, timeout=PAGE_TIMEOUT, polling=250)
        if (found := problems(page.evaluate(READ_NOTEBOOK), server["root"] / path.name)) or path != NOTEBOOK:
            return found
        step = "dragging a latent slider: the decoded digit did not change"
        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        handle = panel.locator(".widget-slider .noUi-handle").first
        handle.scroll_into_view_if_needed(timeout=PAGE_TIMEOUT)
        before, box = panel.locator("img.widget-image").first.get_attribute("src"), handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 60, y, steps=6)
        page.mouse.up()
        page.wait_for_function("before => document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
                               "img.widget-image').src !== before", arg=before, timeout=30_000, polling=250)
        return []
    except PlaywrightError as error:
        running = [cell["index"] + 1 for cell in page.evaluate(READ_NOTEBOOK) if "*" in cell["prompt"]]
        return [f"failed while {step}: {error.message.splitlines()[0]}; cells still running: {running}"]


def test_run_all_cells_in_jupyterlab(page, lab_server, tmp_path):  # `page` first: it may skip
    for path in (NOTEBOOK, COMPANION):  # in one JupyterLab and one OUT_DIR: the companion reads the checkpoint
        if found := what_a_reader_sees(page, lab_server, path):
            page.screenshot(path=tmp_path / "screenshot.png", full_page=True)
            pytest.fail(f"{path.name}: " + "\n".join(found) + f"\nscreenshot: {tmp_path / 'screenshot.png'}; "
                        f"server log: {lab_server['log']}", pytrace=False)
    assert (lab_server["out"] / "evaluation.json").is_file()
