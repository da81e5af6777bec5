"""The notebooks as a reader runs them: JupyterLab in a real (headless) Chromium, driven by Playwright.

A scratch folder gets copies of both notebooks (outputs cleared), of vae_helpers.py and of the committed sweep
results that the companion reads; JupyterLab serves it on 127.0.0.1 with the quick configuration and one
OUT_DIR in its environment, so every kernel inherits them. The test opens the walkthrough, clicks
*Run > Run All Cells*, waits for the kernel and checks the page itself: every code cell ran, no cell shows an
error, every figure is displayed, MathJax rendered the equations, and training progress is one line updated
in place. Then it does the same with the companion, Evaluating_a_trained_VAE.ipynb, in the same JupyterLab:
it evaluates the checkpoint that the walkthrough just wrote to that OUT_DIR (no progress line there: it
trains nothing). On failure a screenshot and the server log are saved in the test's tmp_path.

Chromium is Debian's (`apt-get install chromium`): Playwright's own browser download cannot work offline.
Without Chromium or Playwright the test skips, except under CI, where it fails: CI must not pass by skipping.
Run it alone with `.venv/bin/python -m pytest -m browser`.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import COMPANION, KEPT_SETTINGS, NOTEBOOK, QUICK_SETTINGS, REPO, data_root

pytestmark = [pytest.mark.browser, pytest.mark.notebook]  # `notebook`: conftest skips it when MNIST is absent

# Run in this order: the companion evaluates the checkpoint (OUT_DIR/vae.pt) that the walkthrough writes.
NOTEBOOKS = (NOTEBOOK, COMPANION)
SWEEP_RESULTS = Path("results") / "sweep"  # what the companion's last section reads, relative to its folder

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# Known-good flags for Debian's Chromium as root in a container: no sandbox (root), no GPU, and none of
# Chromium's own background traffic (updates, sync, QUIC probes), since nothing beyond 127.0.0.1 may be reached.
# Playwright adds --headless itself (headless=True) and gives each launch a fresh, temporary user-data-dir.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]  # straight to 127.0.0.1, whatever proxy the environment names
SERVER_START_TIMEOUT = 60  # seconds for JupyterLab to answer
PAGE_TIMEOUT = 90_000  # milliseconds for the page and the kernel to be ready
# Milliseconds for Run All: the quick configuration takes 15-30 s on 2 idle cores, ~3 min when other jobs load them.
RUN_TIMEOUT = 300_000  # for each notebook
# The training cell's progress display once an epoch has finished, e.g. "epoch 1: batch 16/16".
PROGRESS_LINE = re.compile(r"epoch (\d+): batch (\d+)/(\d+)")
MAX_TRAINING_OUTPUT_LINES = 10  # the progress line, one line per epoch (1 here) and the summary
# TeX in a markdown cell's source: $...$ or $$...$$ outside `code spans` (where a $ is literal).
TEX = re.compile(r"\$[^$]+\$", re.DOTALL)
CODE_SPAN = re.compile(r"`[^`]*`")
# TeX that MathJax would have replaced: display delimiters, environments and commands the notebooks use.
RAW_TEX = re.compile(r"\$\$|\\begin\{|\\frac|\\mathbb|\\mathcal|\\mathrm|\\mid|\\sum|\\log|\\underbrace")
# A figure that a code cell always displays: `plt.show()` or `display(Image(...))` as a statement of its own at the
# cell's top level (not indented: not under an `if`, which may skip it, or a loop, which may repeat it).
SHOWN_FIGURE = re.compile(r"^(?:plt\.show\(\)|display\(Image\()", re.MULTILINE)
# JupyterLab's settings for this run. Plain (non-windowed) rendering keeps every cell in the page, so all
# outputs and equations can be checked without scrolling; no news or update checks (no network).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}
# Front-end plugins that would reach the network: the news announcements and the extension manager (PyPI).
DISABLED_PLUGINS = {
    "@jupyterlab/apputils-extension:announcements": True,
    "@jupyterlab/extensionmanager-extension": True,
}


def truthy(value):
    """True for an environment variable's value that means yes (CI=true, CI=1, ...)."""
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def missing_or_skip(what):
    """A missing browser tool: skip locally, but fail under CI so that CI can never pass by skipping."""
    if truthy(os.environ.get("CI")):
        pytest.fail(f"{what} (CI is set: the browser test must run, not skip)")
    pytest.skip(what)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expected_figures(notebook_path):
    """At least how many figures the notebook displays: the image outputs of its committed run, or, where the
    notebook is committed without outputs (while it is being rewritten, say), its unconditional figure calls.

    Each count alone is a lower bound for a run in the quick configuration: the committed run showed that many
    images, and every top-level `plt.show()`/`display(Image(...))` shows one. Taking the larger of the two keeps
    the check as strict as the committed outputs allow and meaningful without them; it is never below one.
    """
    committed = nbformat.read(notebook_path, as_version=4)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    images = sum("image/png" in output.get("data", {}) for cell in code for output in cell.outputs)
    calls = sum(len(SHOWN_FIGURE.findall(cell.source)) for cell in code)
    return max(images, calls, 1)


def cells_with_tex(notebook_path):
    """For each markdown cell of the notebook, in order: whether its source has TeX for MathJax to render."""
    notebook = nbformat.read(notebook_path, as_version=4)
    return [bool(TEX.search(CODE_SPAN.sub("", cell.source))) for cell in notebook.cells if cell.cell_type == "markdown"]


def scratch_copy(folder):
    """Copy both notebooks (outputs and counts cleared: only this run's may be on the page), vae_helpers.py and
    the committed sweep results (so the companion's comparisons show their tables, as in the repository)."""
    for path in NOTEBOOKS:
        if not path.is_file():
            pytest.fail(f"{path.name} is not in {REPO}: the browser test runs both notebooks", pytrace=False)
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(notebook, folder / path.name)
    shutil.copy2(REPO / "vae_helpers.py", folder / "vae_helpers.py")
    if (REPO / SWEEP_RESULTS).is_dir():
        shutil.copytree(REPO / SWEEP_RESULTS, folder / SWEEP_RESULTS)


def kill_kernels_of(runtime_dir):
    """End the kernels that this server started, by pid: their command line names our own runtime folder.

    jupyter_client starts each kernel in a session of its own, so signalling the server's process group does
    not reach them; the server shuts them down on SIGTERM, and this catches any left if it had to be killed.
    """
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(runtime_dir) in cmdline and "kernel" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def stop(process, timeout=20):
    """Terminate the server we started (it shuts its kernels down), wait, and kill its process group if need be."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    # Whatever is left in the group it leads (the server itself if it hung, helpers it started) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def jupyterlab(tmp_path):
    """Serve scratch copies of the notebooks in JupyterLab with the quick configuration; stop it on leaving."""
    root, jupyter = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    scratch_copy(root)
    # Private Jupyter folders: no user settings, workspaces or kernelspecs from the home folder can change
    # what this run sees, and nothing is written outside tmp_path.
    dirs = {name: jupyter / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    (dirs["config"] / "labconfig").mkdir()
    (dirs["config"] / "labconfig" / "page_config.json").write_text(json.dumps({"disabledExtensions": DISABLED_PLUGINS}))
    for name, values in LAB_SETTINGS.items():
        (dirs["settings"] / name).parent.mkdir(parents=True, exist_ok=True)
        (dirs["settings"] / name).write_text(json.dumps(values))

    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_") or k in KEPT_SETTINGS}
    env.update(
        QUICK_SETTINGS,
        VAE_OUT_DIR=str(tmp_path / "out"),
        VAE_DATA_DIR=str(data_root().resolve()),
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
        IPYTHONDIR=str(dirs["ipython"]),
        JUPYTER_PLATFORM_DIRS="1",
        PYTHONUNBUFFERED="1",
    )
    port, token = free_port(), secrets.token_hex(24)
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        # Its own process group, so that stopping it stops whatever it runs in that group too.
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
        while True:
            assert process.poll() is None, f"JupyterLab exited with {process.returncode}; log: {log_path}"
            try:
                with direct.open(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"JupyterLab did not answer in time; log: {log_path}"
                time.sleep(0.5)
        yield {"url": url, "token": token, "log": log_path, "root": root, "out": tmp_path / "out"}
    finally:
        stop(process)
        kill_kernels_of(dirs["runtime"])


@pytest.fixture
def lab_server(tmp_path):
    """A JupyterLab serving scratch copies of the notebooks with the quick configuration; stopped afterwards."""
    with jupyterlab(tmp_path) as server:
        yield server


@pytest.fixture
def browser_page(tmp_path):
    """A page in headless Debian Chromium that can reach 127.0.0.1 only; closed afterwards."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_or_skip("Playwright is not installed (it is in requirements-dev.txt: `make dev`)")
    if not os.access(CHROMIUM, os.X_OK):
        missing_or_skip(f"Chromium is not at {CHROMIUM} (Debian: `apt-get install chromium`)")
    with sync_playwright() as playwright:
        # launch() gives Chromium a fresh, temporary profile of its own (removed when it closes).
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, chromium_sandbox=False
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # Nothing beyond the local server: any other request is refused (and noted in the console log).
            blocked = []

            def local_only(route):
                """Let requests to 127.0.0.1 through; abort every other one."""
                if route.request.url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:")):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.blocked_requests = blocked
            yield page
        finally:
            browser.close()


# What the test reads from the page, in one evaluation: per cell, its kind, prompt, outputs and equations.
READ_NOTEBOOK = r"""() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')]
  .map((cell, index) => ({
    index,
    kind: cell.classList.contains('jp-CodeCell') ? 'code'
      : cell.classList.contains('jp-MarkdownCell') ? 'markdown' : 'raw',
    prompt: (cell.querySelector('.jp-InputPrompt')?.textContent || '').trim(),
    errors: [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map(el => el.innerText).filter(text => /Traceback|Error|Exception/.test(text)),
    outputs: [...cell.querySelectorAll('.jp-OutputArea-output')].map(el => el.innerText.trim()),
    images: [...cell.querySelectorAll('.jp-OutputArea-output img')].map(img => img.naturalWidth),
    math: cell.querySelectorAll('.jp-RenderedMarkdown mjx-container').length,
    mathErrors: cell.querySelectorAll('.jp-RenderedMarkdown mjx-merror, .jp-RenderedMarkdown [data-mjx-error]').length,
    markdown: cell.querySelector('.jp-RenderedMarkdown')?.innerText || '',
  }))"""

# The notebook's kernel is connected and idle. The toolbar's execution indicator alone says "idle" even before
# a kernel exists, so the status bar's "Python 3 (ipykernel) | Idle" must agree.
KERNEL_IDLE = r"""
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const indicator = panel && panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const status = [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(item => item.textContent.trim());
  const idle = indicator && indicator.getAttribute('data-status') === 'idle'
    && status.some(text => / \| Idle$/.test(text) && !text.startsWith('No Kernel'));
"""
# Finished: the kernel is idle and nothing is queued, and either every code cell has a count or a cell shows
# an error (after an error JupyterLab stops Run All and leaves the later cells without a count).
RUN_FINISHED = (
    "() => {"
    + KERNEL_IDLE
    + r"""
  if (!idle) return false;
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  if (prompts.length === 0 || prompts.some(p => p.includes('*'))) return false;
  if (prompts.every(p => /\[\d+\]/.test(p))) return true;
  return [...panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .some(el => /Traceback/.test(el.innerText));
}"""
)


# The page has settled: every output image is loaded, and the numbers of outputs, equations and loaded images
# have not changed for a second (MathJax typesets and images decode asynchronously, after the kernel is done).
PAGE_SETTLED = r"""() => {
  const images = [...document.querySelectorAll('.jp-OutputArea-output img')];
  if (!images.every(img => img.complete)) return false;
  const signature = [document.querySelectorAll('.jp-OutputArea-output').length,
                     document.querySelectorAll('mjx-container').length, images.length].join();
  const now = Date.now();
  if (!window.__settled || window.__settled.signature !== signature) {
    window.__settled = {signature, since: now};
    return false;
  }
  return now - window.__settled.since > 1000;
}"""


def evidence(page, tmp_path, server, cell_index=None):
    """Save a full-page screenshot (scrolled to `cell_index`, if given); return where it and the server log are."""
    if cell_index is not None:
        cell = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(cell_index)
        cell.scroll_into_view_if_needed(timeout=5_000)
    screenshot = tmp_path / "screenshot.png"
    page.screenshot(path=screenshot, full_page=True)
    return f"screenshot: {screenshot}; server log: {server['log']}"


def run_all_cells(page, server, notebook, check):
    """Open `notebook` (a name in the server's root), click Run > Run All Cells and wait until the run is over and
    the page has settled; return what the page shows, per cell, each with the `name` the failure messages use."""
    from playwright.sync_api import Error as PlaywrightError  # importable: browser_page skips otherwise

    step, failure = f"opening {notebook}", None
    try:
        # `reset`: a fresh workspace, so that only this notebook is open (no tab of the one before is restored).
        page.goto(f"{server['url']}/lab/tree/{notebook}?reset&token={server['token']}", timeout=PAGE_TIMEOUT)
        step = "waiting for the kernel to be idle"
        page.wait_for_function("() => {" + KERNEL_IDLE + "return idle; }", timeout=PAGE_TIMEOUT, polling=250)
        step = "clicking Run > Run All Cells"  # through the menus, as a reader does it
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        step = f"waiting for Run All to finish (at most {RUN_TIMEOUT // 1000} s)"
        page.wait_for_function(RUN_FINISHED, timeout=RUN_TIMEOUT, polling=500)
        step = "waiting for the outputs and equations to settle"
        page.wait_for_function(PAGE_SETTLED, timeout=PAGE_TIMEOUT, polling=250)
        cells = page.evaluate(READ_NOTEBOOK)
    except PlaywrightError as error:
        failure = f"failed while {step}: {error.message.splitlines()[0]}"
    if failure:
        running = None
        with contextlib.suppress(PlaywrightError):  # name and show the first cell still running or queued
            cells = page.evaluate(READ_NOTEBOOK)
            running = next((c for c in cells if "*" in c["prompt"]), None)
        if running:
            failure += f"; cell {running['index'] + 1}/{len(cells)} is still {running['prompt']}"
        check(False, failure, running)
    for cell in cells:  # as JupyterLab's status bar counts cells ("cell 12/74"), with the prompt of a code cell
        cell["name"] = f"cell {cell['index'] + 1}/{len(cells)}" + (
            f" {cell['prompt']}" if cell["kind"] == "code" else ""
        )
    return cells


def check_run(cells, notebook_path, check):
    """Every code cell of the notebook ran without an error, its figures are displayed and its equations rendered."""
    figures, tex = expected_figures(notebook_path), cells_with_tex(notebook_path)
    code = [c for c in cells if c["kind"] == "code"]
    markdown = [c for c in cells if c["kind"] == "markdown"]
    check(
        code and len(markdown) == len(tex),
        f"the page shows {len(code)} code and {len(markdown)} markdown cells; "
        f"the notebook has {len(tex)} markdown cells",
    )

    # Every code cell ran, and none shows an error (JupyterLab renders a traceback as stderr text).
    for cell in code:
        check(
            not cell["errors"], f"{cell['name']} shows an error:\n{cell['errors'] and cell['errors'][0][-2000:]}", cell
        )
    for cell in code:
        check(
            re.fullmatch(r"\[\d+\]:?", cell["prompt"]),
            f"{cell['name']} did not run: its prompt is {cell['prompt']!r}",
            cell,
        )

    # The figures are on the page and the browser decoded them.
    images = [width for cell in code for width in cell["images"]]
    check(len(images) >= figures, f"{len(images)} figures displayed, expected at least {figures}")
    for cell in code:
        check(
            all(width > 0 for width in cell["images"]),
            f"a figure in {cell['name']} is not displayed (naturalWidth 0)",
            cell,
        )

    # MathJax rendered every markdown cell's equations, without errors and without leaving raw TeX behind.
    for cell, has_tex in zip(markdown, tex):
        check(
            cell["math"] > 0 or not has_tex,
            f"MathJax rendered no equation in markdown {cell['name']}, "
            f"whose source has TeX: {cell['markdown'][:200]!r}",
            cell,
        )
        check(not cell["mathErrors"], f"MathJax shows an error in markdown {cell['name']}", cell)
        raw = RAW_TEX.search(cell["markdown"])
        check(
            raw is None,
            f"markdown {cell['name']} shows raw TeX {raw and raw.group()!r} near "
            f"{raw and cell['markdown'][max(raw.start() - 80, 0) : raw.end() + 80]!r}",
            cell,
        )


def check_training_progress(cells, check):
    """The walkthrough's training progress is one short line updated in place ("epoch 1: batch 16/16")."""
    code = [c for c in cells if c["kind"] == "code"]
    training = next((c for c in code if any(PROGRESS_LINE.search(text) for text in c["outputs"])), None)
    check(training, "no cell shows training progress (a line like 'epoch 1: batch 16/16')")
    shown = [line.strip() for text in training["outputs"] for line in text.splitlines() if PROGRESS_LINE.search(line)]
    alone = [text for text in training["outputs"] if PROGRESS_LINE.fullmatch(text)]
    check(
        len(shown) == 1 and len(alone) == 1,
        f"{training['name']} shows {len(shown)} progress lines, not one output updated in place: "
        f"{shown[:3]}{' ...' if len(shown) > 3 else ''}",
        training,
    )
    epoch, batch, batches = map(int, PROGRESS_LINE.fullmatch(alone[0]).groups())
    check(
        batch == batches and epoch == int(QUICK_SETTINGS["VAE_EPOCHS"]),
        f"the progress line in {training['name']} did not reach the end of training: {alone[0]!r}",
        training,
    )
    lines = sum(len(text.splitlines()) for text in training["outputs"])
    check(
        lines <= MAX_TRAINING_OUTPUT_LINES,
        f"{training['name']} shows {lines} output lines; progress should update in place: {training['outputs']}",
        training,
    )


def test_run_all_cells_in_jupyterlab(browser_page, lab_server, tmp_path):  # the browser first: it may skip
    """Run > Run All Cells in JupyterLab, the walkthrough and then the companion that evaluates its checkpoint;
    each page then shows a complete, error-free, fully rendered run."""
    page, server = browser_page, lab_server
    console = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))

    for notebook in NOTEBOOKS:  # one after the other in one JupyterLab, with one OUT_DIR

        def check(condition, message, cell=None, notebook=notebook.name):
            """Assert on the page; on failure save a screenshot (showing `cell`) and the console log, and say where."""
            if not condition:
                blocked = [f"blocked: {url}" for url in page.blocked_requests]
                (tmp_path / "console.log").write_text("\n".join(console + blocked))
                where = evidence(page, tmp_path, server, cell and cell["index"])
                pytest.fail(f"{notebook}: {message}\n{where}", pytrace=False)

        cells = run_all_cells(page, server, notebook.name, check)
        check_run(cells, server["root"] / notebook.name, check)
        if notebook == NOTEBOOK:  # the companion trains nothing: no progress line there
            check_training_progress(cells, check)
        else:  # the companion read the walkthrough's checkpoint from the shared OUT_DIR and wrote its numbers there
            check((server["out"] / "evaluation.json").is_file(), f"no evaluation.json in OUT_DIR {server['out']}")
