"""tools/verdict_list.py: the README's verdict list is the notebooks' stored verdict lines, no more."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import verdict_list as vl  # noqa: E402  (tools/ is not a package)

from dcal_studies.verdicts import flip, judge, report  # noqa: E402


def test_readme_verdict_list_matches_the_notebooks():
    d = vl.diff()
    assert not d, f"README.md's verdict list differs from the notebooks' stored outputs:\n{d}\n" \
                  "re-run the notebook, then `python tools/verdict_list.py --write`"


def write_nb(path: Path, *outputs: str, title: str = "# Fix 9: a title") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(f"{title}\n\nprose"))
    for text in outputs:
        cell = nbformat.v4.new_code_cell("print(...)")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_lines_are_parsed_deduplicated_and_flips_left_out(tmp_path):
    v1, v2 = judge("w follows Σlr (the replay)", 0.0003, 0.00058, holds_if="<"), judge("clamp engaged", 0.0835, 1.0)
    perturbed = flip(v2, judge("clamp engaged", 0.0835, 0.05), "threshold 1 → 0.05")
    write_nb(tmp_path / "09_x.ipynb", f"numbers 0.5\n{report([v1])}\n", f"{report([v1, v2])}\n{perturbed}\n")
    write_nb(tmp_path / "08_none.ipynb", "no verdicts here\n", title="# Nothing judged")
    lines = vl.verdict_lines(tmp_path / "09_x.ipynb")
    assert [(x.claim, x.label) for x in lines] == [(v1.claim, "confirmed"), ("clamp engaged", "refuted")]
    text = vl.generate(tmp_path)
    assert "Nothing judged" not in text and "**Fix 9: a title** (`notebooks/09_x.ipynb`)" in text
    assert f"- clamp engaged → **refuted** ({v2.reason})" in text and "flip under" not in text


def test_same_claim_with_two_labels_is_an_error_naming_the_cells(tmp_path):
    a, b = judge("c", 1.0, 0.5), judge("c", 0.1, 0.5)
    write_nb(tmp_path / "01_x.ipynb", f"{a}\n", f"{b}\n")
    with pytest.raises(vl.VerdictListError, match=r"01_x.ipynb: claim 'c' printed as 'confirmed' \(cell 1\) and "
                                                  r"as 'refuted' \(cell 2\)"):
        vl.verdict_lines(tmp_path / "01_x.ipynb")


def test_check_fails_when_the_readme_says_more_and_write_repairs_it(tmp_path):
    write_nb(tmp_path / "01_x.ipynb", f"{judge('c', 1.0, 0.5)}\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# R\n\n{vl.BEGIN}\n{vl.generate(tmp_path)}\n- an extra claim → **confirmed** (hand-written)\n"
                      f"{vl.END}\n\n## After\n", encoding="utf-8")
    d = vl.diff(readme, tmp_path)
    assert "+" not in d.splitlines()[-1] and "-- an extra claim" in d
    readme.write_text(vl.with_section(readme.read_text(encoding="utf-8"), vl.generate(tmp_path), readme),
                      encoding="utf-8")
    assert vl.diff(readme, tmp_path) == "" and readme.read_text(encoding="utf-8").endswith(f"{vl.END}\n\n## After\n")


@pytest.mark.parametrize("text, match", [
    ("no markers\n", "found 0 and 0"),
    (f"{vl.BEGIN}\nx\n{vl.END}\n{vl.END}\n", "found 1 and 2"),
    (f"a {vl.BEGIN}\nx\n{vl.END}\n", "line of its own"),
])
def test_markers_must_be_there_once_on_their_own_lines(text, match):
    with pytest.raises(vl.VerdictListError, match=match):
        vl.split_readme(text)
