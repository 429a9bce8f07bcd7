"""The notebooks: each has its jupytext twin in sync, stored outputs, no stored errors, fixed seeds.

nbval itself (run by `make test`) re-executes them and compares outputs; this file checks what nbval
cannot: that the reviewed `.py` twin is what the `.ipynb` runs.
"""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["00_quickstart", "01_learning_rate", "02_memory", "03_accuracy_collapse", "04_uncertainty_weights",
         "05_attention_glca_pwca", "06_diagnose_a_run"]
PRESENT = [n for n in NAMES if (NB_DIR / f"{n}.ipynb").exists()]


def code_and_markdown(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells if c.cell_type in ("code", "markdown")]


@pytest.mark.parametrize("name", PRESENT)
def test_twin_in_sync(name):
    ipynb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    twin = jupytext.read(NB_DIR / f"{name}.py")
    assert code_and_markdown(ipynb) == code_and_markdown(twin), f"{name}.py and {name}.ipynb differ: run `make notebooks`"


@pytest.mark.parametrize("name", PRESENT)
def test_outputs_stored_and_clean(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, name
    assert all(c.get("execution_count") for c in code), f"{name}: cells without stored outputs"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{name}: stored errors"
    ignored = sum("nbval-ignore-output" in c.metadata.get("tags", []) for c in code)
    assert ignored <= len(code) // 2, f"{name}: {ignored}/{len(code)} cells ignore their output"
    src = "\n".join(c.source for c in code)
    assert "set_num_threads(1)" in src and "manual_seed" in src, f"{name}: not deterministic on CPU"
    assert "MPLBACKEND" not in src
