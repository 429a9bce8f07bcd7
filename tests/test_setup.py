"""The project's set-up files: environment.yml defers to pyproject, the CI runs the README's command."""
from __future__ import annotations

import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_parses_and_defers_to_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert any(str(d).startswith("python") for d in deps) and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip == ['-e ".[dev]"'] or pip == ["-e .[dev]"]
    # Nothing else is pinned there: every library comes from pyproject.toml.
    assert all(isinstance(d, dict) or str(d).split("=")[0] in ("python", "pip") for d in deps)


def _names(requirements: list[str]) -> set[str]:
    return {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in requirements}


def test_pyproject_core_is_light_and_the_extras_hold_the_rest():
    """Core = what `import dcal` and `dcal train` need; notebooks, tests and TensorBoard come with extras."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core, extras = _names(meta["dependencies"]), meta["optional-dependencies"]
    assert {"torch", "torchvision", "timm", "numpy", "pyyaml", "pandas", "matplotlib"} <= core
    assert not core & {"jupyterlab", "nbval", "seaborn", "tensorboard", "ipywidgets", "pytest", "jupytext"}, core
    assert "seaborn" not in {n for reqs in extras.values() for n in _names(reqs)}  # ax.plot does its job
    assert {"ipywidgets", "tensorboard"} <= _names(extras["diagnostics"])
    assert {"jupyterlab", "jupytext", "nbclient"} <= _names(extras["notebooks"])
    assert {"pytest", "nbval", "ruff"} <= _names(extras["dev"])
    # `make test` / environment.yml install .[dev], which must pull in the other extras.
    assert any(d.replace(" ", "") in ("dcal[diagnostics,notebooks]", "dcal[notebooks,diagnostics]") for d in extras["dev"])
    assert "dcal[diagnostics]" in extras["notebooks"]
    assert 'pip install -e ".[dev]"' in (ROOT / "Makefile").read_text()
    assert meta["scripts"]["dcal"] == "dcal_app.cli:main"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in ci


def test_demo_command_runs_end_to_end_on_a_tiny_config(tmp_path):
    """`make demo` runs `python -m dcal_app demo`; here on a tiny config (the real one takes minutes)."""
    import subprocess

    from test_train import TINY

    args = [sys.executable, "-m", "dcal_app", "demo", "--out", str(tmp_path / "demo")]
    for s in TINY + [f"data.cache_dir={tmp_path / 'cache'}"]:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy  SA" in r.stdout and "part hit-rate" in r.stdout
    assert (tmp_path / "demo" / "doctor.html").exists()


def test_ruff_is_clean():
    """What `make lint` checks (the Makefile's LINT_PATHS, the notebook twins included)."""
    import glob
    import re
    import subprocess

    paths = re.search(r"^LINT_PATHS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    args = [f for p in paths for f in (sorted(glob.glob(p, root_dir=ROOT)) if "*" in p else [p])]
    r = subprocess.run([sys.executable, "-m", "ruff", "check", *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]


# The extras' top-level modules: `dcal train` must run with none of them importable (a core install).
EXTRAS_MODULES = ("ipywidgets", "tensorboard", "IPython", "jupyterlab", "jupyter_client", "nbclient", "nbformat",
                  "nbconvert", "jupytext", "papermill", "nbval", "pytest", "hypothesis", "playwright", "seaborn")

# A None in sys.modules is how Python marks a module as absent: `import x` raises ModuleNotFoundError and
# `importlib.util.find_spec(x)` returns None, as for a package that was never installed.
_BLOCK_EXTRAS = """
import sys
sys.modules.update(dict.fromkeys({blocked!r}))
from dcal_app.cli import main
sys.exit(main({argv!r}))
"""


def test_dcal_train_runs_on_a_core_install(tmp_path):
    """`pip install .` without extras: `dcal train` (with its default callbacks) imports none of the extras'
    modules; here they are made unimportable, as they are where only the core is installed."""
    import subprocess

    from test_train import TINY

    argv = ["train", "--preset", "demo", "--out", str(tmp_path / "run")]
    for s in TINY + [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1"]:
        argv += ["--set", s]
    code = _BLOCK_EXTRAS.format(blocked=set(EXTRAS_MODULES), argv=argv)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    # The blocker itself works: the same process cannot import an extra.
    probe = code.split("from dcal_app")[0] + "import ipywidgets\n"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr
