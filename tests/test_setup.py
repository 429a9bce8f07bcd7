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


def test_pyproject_declares_the_required_dependencies():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in meta["dependencies"]}
    assert {"torch", "timm", "jupyterlab", "ipywidgets", "matplotlib", "seaborn", "pandas", "nbval"} <= names
    assert "pytest" in " ".join(meta["optional-dependencies"]["dev"])
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
