"""`make notebooks`: rebuild each notebook from its jupytext twin, execute it, save it with outputs.

  python tools/run_notebooks.py [NAME ...]

The `.py` twins (jupytext percent format) are the source for review; the `.ipynb` files keep the outputs
that nbval compares. Execution: one kernel per notebook, a cell timeout, record_timing off (no per-cell
timestamps in the diff), one retry (widget-heavy notebooks can hang on the first kernel start).
After each notebook its stored outputs are linted (`tools/nblint.py`: numbers printed with more digits than
another machine reproduces); the run ends with each notebook's wall time and lint count, and exit status 1
when any output breaks the rule (the notebooks are all written first).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nblint  # noqa: E402  (a sibling script: tools/ is not a package)

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 600


def execute(py: Path) -> Path:
    nb = jupytext.read(py)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)
    out = py.with_suffix(".ipynb")
    env = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    os.environ.update(env)
    for attempt in (1, 2):
        client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(NB_DIR)}})
        try:
            client.execute()
            break
        except Exception as e:  # a hung or crashed kernel: retry once, then re-raise with the notebook name
            if attempt == 2:
                raise RuntimeError(f"{py.name}: execution failed twice: {e}") from e
            print(f"{py.name}: attempt {attempt} failed ({type(e).__name__}); retrying", file=sys.stderr)
    for i, cell in enumerate(nb.cells):  # stable ids: a re-run changes only what the notebook printed
        cell["id"] = f"cell-{i}"
    nbformat.write(nb, out)
    return out


def main(names: list[str]) -> int:
    pys = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))
    if names:
        pys = [p for p in pys if any(n in p.name for n in names)]
    flagged = 0
    for py in pys:
        t = time.perf_counter()
        out = execute(py)
        flags = nblint.lint_notebook(out)
        for f in flags:
            print(f"  lint: {f}", file=sys.stderr)
        flagged += len(flags)
        print(f"{out.name}: executed in {time.perf_counter() - t:.0f} s; {len(flags)} printed floats break "
              "the output rule")
    return 1 if flagged else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
