"""The import direction: `dcal` ← `diagnostics` ← `dcal_app`; `dcal_studies` beside the app.

Every import statement counts, also one inside a function (a lazy import is still a dependency). A lower
layer importing a higher one fails here with the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the packages it must never import
FORBIDDEN = {
    "dcal": {"diagnostics", "dcal_app", "dcal_studies"},
    "diagnostics": {"dcal_app", "dcal_studies"},
    "dcal_studies": {"dcal_app"},
}


def imported_packages(path: Path) -> list[tuple[str, int]]:
    """(top-level package, line) for every absolute import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
            found.append((node.args[0].value.split(".")[0], node.lineno))
    return found


def violations(package: str, forbidden: set[str]) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {mod}"
            for p in sorted((ROOT / package).rglob("*.py"))
            for mod, line in imported_packages(p) if mod in forbidden]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_from_a_lower_layer_to_a_higher_one(package):
    assert violations(package, FORBIDDEN[package]) == []


def test_the_check_can_fail(tmp_path, monkeypatch):
    """The scanner sees top-level, lazy and importlib imports (so a green test means something)."""
    pkg = tmp_path / "dcal"
    pkg.mkdir()
    (pkg / "a.py").write_text("import os\n\ndef f():\n    import diagnostics.doctor\n")
    (pkg / "b.py").write_text("import importlib\nimportlib.import_module('dcal_app.cli')\n")
    (pkg / "c.py").write_text("from .x import y\nfrom dcal_studies.verdicts import judge\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations("dcal", FORBIDDEN["dcal"]) == [
        "dcal/a.py:4 imports diagnostics", "dcal/b.py:2 imports dcal_app", "dcal/c.py:2 imports dcal_studies"]


def test_console_script_is_the_app():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["scripts"] == {"dcal": "dcal_app.cli:main"}
