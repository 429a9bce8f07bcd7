"""The notebooks as a person sees them: JupyterLab in headless Chromium, Run All, figures and widgets.

Starts `jupyter lab` on 127.0.0.1 (random port, a token, autosave off) over a temporary copy of the
notebooks, opens `00_quickstart.ipynb` and `05_attention_glca_pwca.ipynb` in Chromium driven by Playwright,
waits for the kernel, runs every cell (`runmenu:run-all`), and checks: no traceback in any output, figures
rendered, ipywidgets rendered, and the rollout explorer redrawing when its slider moves. Screenshots go to
the pytest tmp dir; the explorer of notebook 05, cropped to the widget, to `docs/img/glca_explorer.png`.

Chromium comes from Debian (`/usr/bin/chromium`; the test installs it with apt-get when run as root), never
from `playwright install`. Without it: a failure in CI (`CI` set), a skip naming the reason elsewhere.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
IMG_DIR = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOKS = ["00_quickstart", "05_attention_glca_pwca"]
KERNEL_START_S = 120
RUN_ALL_S = 600  # notebook 05 trains 9 short runs: ~2 min on 2 idle cores, longer on a loaded machine
REDRAW_S = 60

# Lab settings for the test: no autosave (the copy is thrown away anyway), every cell attached to the DOM
# (windowing would detach off-screen outputs and hide them from the checks), no news/update toasts.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}

# State of the notebook in the main area, read from JupyterLab's own models (window.jupyterapp).
STATE_JS = """() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.sessionContext || !panel.content) return null;
  const ctx = panel.sessionContext;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const queued = cells.filter(c => /\\[\\*\\]/.test(c.node.querySelector('.jp-InputPrompt')?.textContent || ''));
  const errors = [];
  cells.forEach((c, i) => c.model.outputs.toJSON().forEach(o => {
    if (o.output_type === 'error') errors.push(`code cell ${i}: ${o.ename}: ${o.evalue}`);
  }));
  return {
    ready: ctx.isReady, status: ctx.kernelDisplayStatus, path: panel.context.path,
    cells: cells.length, executed: cells.filter(c => c.model.executionCount !== null).length,
    queued: queued.length, errors: errors,
  };
}"""


# --------------------------------------------------------------------------------------------- set-up
def _unavailable(reason: str):
    """Fail in CI (a missing browser must not pass as a skip there), skip with the reason elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"browser test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _chromium() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _unavailable(f"{CHROMIUM} is missing; install Debian's chromium (`sudo apt-get install -y chromium`)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run("apt-get update && apt-get install -y chromium", shell=True, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not Path(CHROMIUM).is_file():
        _unavailable(f"`apt-get install -y chromium` failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a temporary copy of the notebooks: (base URL, token, log path, root)."""
    for name in NOTEBOOKS:
        if not (NB_DIR / f"{name}.ipynb").is_file():
            pytest.fail(f"notebooks/{name}.ipynb is missing: run `make notebooks`", pytrace=False)
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _unavailable("jupyterlab is not installed in this environment (pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(NB_DIR / f"{name}.ipynb", root)
    shutil.copytree(NB_DIR / "seed_evidence", root / "seed_evidence")  # the fix notebooks read the seed's log
    settings = tmp / "settings"
    for rel, value in LAB_SETTINGS.items():
        f = settings / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MPLBACKEND", None)
    log = tmp / "jupyter.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{_tail(log)}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer on {base} within 90 s:\n{_tail(log)}", pytrace=False)
            time.sleep(0.5)
        yield base, token, log, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(lab):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    exe = _chromium()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


# --------------------------------------------------------------------------------------------- helpers
def _wait_state(page, predicate, timeout_s: float, what: str, log: Path) -> dict:
    """Poll STATE_JS until `predicate(state)`; fail naming `what` and the last state seen."""
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = page.evaluate(STATE_JS)
        if state is not None and predicate(state):
            return state
        page.wait_for_timeout(500)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; last state: {state}\n"
                f"server log tail:\n{_tail(log)}", pytrace=False)


def _explorer_image_src(explorer) -> str:
    img = explorer.locator(".widget-output img").first
    img.wait_for(state="visible", timeout=REDRAW_S * 1000)
    return img.get_attribute("src") or ""


# --------------------------------------------------------------------------------------------- the test
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(name, lab, browser, tmp_path, capsys):
    base, token, log, _root = lab
    t0 = time.perf_counter()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    try:
        # A workspace of its own per notebook, so that the other notebook is not restored beside it.
        page.goto(f"{base}/lab/workspaces/{name.replace('_', '-')}/tree/{name}.ipynb?token={token}",
                  wait_until="domcontentloaded")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=90_000)
        page.locator(".jp-NotebookPanel").first.wait_for(state="visible", timeout=90_000)

        # A Run All sent before the kernel is connected is dropped: wait for Idle first.
        _wait_state(page, lambda s: s["path"].endswith(f"{name}.ipynb") and s["ready"] and s["status"] == "idle",
                    KERNEL_START_S, f"{name}: kernel idle before Run All", log)
        t_run = time.perf_counter()
        page.evaluate("() => window.jupyterapp.commands.execute('runmenu:run-all')")
        state = _wait_state(
            page,
            lambda s: s["status"] == "idle" and s["queued"] == 0 and (s["executed"] == s["cells"] or s["errors"]),
            RUN_ALL_S, f"{name}: Run All to finish", log)
        run_s = time.perf_counter() - t_run
        page.screenshot(path=str(tmp_path / f"{name}_after_run_all.png"), full_page=True)

        assert not state["errors"], f"{name}: cells raised in JupyterLab: {state['errors']}"
        assert state["executed"] == state["cells"], f"{name}: only {state['executed']}/{state['cells']} code cells ran"
        tracebacks = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
                                  has_text="Traceback")
        assert tracebacks.count() == 0, f"{name}: traceback in an output: {tracebacks.first.inner_text()[:2000]}"
        rendered_tb = page.locator(".jp-RenderedText", has_text="Traceback")
        assert rendered_tb.count() == 0, f"{name}: traceback in an output: {rendered_tb.first.inner_text()[:2000]}"

        figures = page.locator(".jp-OutputArea-output .jp-RenderedImage img")
        assert figures.count() >= 1, f"{name}: no figure rendered in the outputs"
        widgets = page.locator(".jp-OutputArea-output .jupyter-widgets")
        sliders = page.locator(".jp-OutputArea-output .widget-slider")
        assert widgets.count() >= 1 and sliders.count() >= 1, (
            f"{name}: ipywidgets did not render ({widgets.count()} widget elements, {sliders.count()} sliders); "
            f"browser console errors: {console_errors[-5:]}")

        # The rollout explorer: move its image slider with the keyboard and wait for a new picture.
        explorer = page.locator(".jp-OutputArea-output .widget-vbox").filter(
            has=page.locator(".widget-slider")).filter(has=page.locator(".widget-output")).last
        explorer.scroll_into_view_if_needed()
        before = _explorer_image_src(explorer)
        assert before.startswith("data:image/png"), f"{name}: the explorer shows no PNG (src={before[:60]!r})"
        readout = explorer.locator(".widget-readout").first
        value_before = readout.inner_text().strip()
        handle = explorer.locator(".widget-slider .noUi-handle").first
        handle.focus()
        page.keyboard.press("ArrowRight")
        deadline = time.monotonic() + REDRAW_S
        after = before
        while time.monotonic() < deadline and after == before:
            page.wait_for_timeout(250)
            after = _explorer_image_src(explorer)
        value_after = readout.inner_text().strip()
        assert value_after != value_before, f"{name}: the image slider did not move (readout {value_before!r})"
        assert after != before, f"{name}: the explorer picture did not change after the slider moved " \
                                f"({value_before} -> {value_after})"
        page.wait_for_timeout(300)  # let the new image lay out before the screenshots
        explorer.screenshot(path=str(tmp_path / f"{name}_explorer.png"))
        if name == "05_attention_glca_pwca":
            IMG_DIR.mkdir(parents=True, exist_ok=True)
            explorer.screenshot(path=str(IMG_DIR / "glca_explorer.png"))

        page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
    finally:
        context.close()
        wall = time.perf_counter() - t0
        with capsys.disabled():
            ran = f", Run All {run_s:.0f} s" if "run_s" in locals() else ""
            print(f"\n[browser] {name}: {wall:.0f} s in JupyterLab{ran}; screenshots in {tmp_path}")
