"""Copy each jupytext twin's cell sources into its `.ipynb`, keeping the stored outputs.

  python tools/sync_twins.py [NAME ...]

For a change that touches only sources (an import renamed, a comment): the outputs stay valid, so the
notebook need not be re-executed. Refuses when the cells no longer line up (count or type): then
`make notebooks` must run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def sync(name: str) -> bool:
    twin = jupytext.read(NB_DIR / f"{name}.py")
    path = NB_DIR / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    kinds = [c.cell_type for c in nb.cells]
    if kinds != [c.cell_type for c in twin.cells]:
        raise SystemExit(f"{path}: its cells no longer line up with {name}.py; run `make notebooks`")
    changed = False
    for cell, src in zip(nb.cells, twin.cells, strict=True):
        if cell.source != src.source:
            cell.source, changed = src.source, True
    if changed:
        nbformat.write(nb, path)
    return changed


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.stem for p in NB_DIR.glob("*.py"))
    for n in names:
        print(f"{n}: {'synced' if sync(n) else 'unchanged'}")
