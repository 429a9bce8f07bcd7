"""Packaging: `import diagnostics` stays light (no IPython/ipywidgets), the wheel ships the assets, the
files the code and the package data point to exist, and `make lint` covers the notebook twins."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("IPython", "ipywidgets")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_import_diagnostics_leaves_ipython_and_ipywidgets_unloaded():
    code = f"""
import sys
import diagnostics
from dcal_app.cli import _callbacks
from dcal.train import build_trainer
_callbacks(True)  # what `dcal train` attaches
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
for name in diagnostics.__all__:  # every exported name still resolves (the widgets on first use)
    getattr(diagnostics, name)
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = r.stdout.strip().splitlines()[-2:]
    assert before == "[]", before
    assert after == str(sorted(HEAVY))  # the widgets load them when asked for


def test_unknown_diagnostics_attribute_is_an_attribute_error():
    import diagnostics

    with pytest.raises(AttributeError, match="no attribute 'RunExploder'"):
        diagnostics.RunExploder  # noqa: B018


def _source_files() -> list[str]:
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                       check=True)
    return [f for f in r.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.mark.slow
def test_the_wheel_ships_the_assets_and_every_module(tmp_path):
    src = tmp_path / "src"
    for rel in _source_files():  # build from a copy: setuptools writes build/ into the source tree
        if rel.startswith(("dcal/", "diagnostics/")) or rel in ("pyproject.toml", "README.md"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), "-q"], cwd=src, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("dcal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = [p for p in (ROOT / "dcal" / "assets").iterdir() if p.suffix in (".safetensors", ".yaml", ".jsonl")]
    assert any(p.suffix == ".safetensors" for p in assets)
    for p in assets:
        assert f"dcal/assets/{p.name}" in names, p.name
    for rel in _source_files():
        if rel.endswith(".py") and rel.startswith(("dcal/", "diagnostics/")) and "_tmp" not in rel:
            assert rel in names, rel


def test_package_data_globs_match_files():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package, globs in meta["tool"]["setuptools"]["package-data"].items():
        for pattern in globs:
            if pattern.endswith(".md"):
                continue  # notes, optional
            assert list((ROOT / package).glob(pattern)), f"package-data {package}: {pattern} matches no file"


def test_files_the_code_points_to_exist():
    """Every `dcal/assets/<file>` named in dcal's sources, the README or pyproject exists."""
    texts = [p.read_text() for p in (ROOT / "dcal").rglob("*.py")] + [(ROOT / "README.md").read_text()]
    named = {m for t in texts for m in re.findall(r"dcal/assets/([\w.\-]+\.\w+)", t)}
    assert named, "no asset reference found: the pattern is out of date"
    missing = sorted(n for n in named if not (ROOT / "dcal" / "assets" / n).exists())
    assert not missing, f"referenced but missing under dcal/assets: {missing}"


def test_make_lint_covers_the_notebook_twins_and_make_test_runs_it():
    make = (ROOT / "Makefile").read_text()
    paths = re.search(r"^LINT_PATHS := (.+)$", make, re.M).group(1).split()
    assert {"dcal", "diagnostics", "tests", "benchmarks", "tools", "notebooks/*.py"} <= set(paths)
    assert re.search(r"^test: .*\blint\b", make, re.M)


def _without(package: str, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `package` cannot be imported (as without its extra)."""
    return run_python(f"import sys\nsys.modules[{package!r}] = None\n" + code)


def test_doctor_on_a_tensorboard_file_without_tensorboard_names_the_extra(tmp_path):
    events = tmp_path / "events.out.tfevents.1700000000.host"
    events.write_bytes(b"\x00" * 64)  # the reader is never reached: its import fails first
    r = _without("tensorboard", f"from dcal_app.doctor import main\nsys.exit(main([{str(events)!r}]))")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "needs the tensorboard package" in r.stderr and "pip install 'dcal[diagnostics]'" in r.stderr
    assert str(events) in r.stderr and "Traceback" not in r.stderr


def test_the_explorers_without_ipywidgets_name_the_extra():
    code = """
import diagnostics
from diagnostics.extras import MissingExtraError
for name in ("run_explorer", "rollout_explorer"):
    try:
        getattr(diagnostics, name)
    except MissingExtraError as e:
        print(name, e)
"""
    r = _without("ipywidgets", code)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all("pip install 'dcal[diagnostics]'" in line for line in lines), lines
    assert "run explorer" in lines[0] and "rollout explorer" in lines[1]


def test_require_passes_on_an_error_inside_an_installed_package(tmp_path):
    """Only a missing package becomes MissingExtraError; a broken import inside one keeps its own error."""
    from diagnostics.extras import MissingExtraError, require

    with pytest.raises(ValueError, match="not an optional package"):
        require("seaborn", "a plot")
    broken = tmp_path / "tensorboard"  # an installed tensorboard whose own import fails
    broken.mkdir()
    (broken / "__init__.py").write_text("import a_dependency_that_is_missing\n")
    r = run_python(f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom diagnostics.extras import require\n"
                   "require('tensorboard.backend.event_processing.event_accumulator', 'x')")
    assert r.returncode != 0 and "MissingExtraError" not in r.stderr
    assert "No module named 'a_dependency_that_is_missing'" in r.stderr
    assert issubclass(MissingExtraError, ImportError)

