"""Lint the stored outputs of notebooks for numbers that will not print the same on another machine.

  python tools/nblint.py [NOTEBOOK.ipynb ...]     (default: every notebooks/NN_*.ipynb)

`make test` compares every stored output with a fresh run (nbval, strict). A float printed with more
digits than the computation is reproducible to differs on another CPU (AMD vs Intel vector widths, another
thread count, another BLAS): 3296.0306 vs 3296.0309, 3.01e-07 vs 3.93e-07. The rule, applied to what nbval
compares (after the sanitizer's substitutions, `notebooks/nbval_sanitize.cfg`):

- a printed float has at most `MAX_SIGNIFICANT` (4) significant digits;
- a non-zero float below `NOISE_FLOOR` (1e-5) in magnitude has at most 1 (a bound: "< 1e-6", not 3.01e-07).

Integers (no decimal point, no exponent) are exact and not checked. A cell whose numbers are exact facts
(values transcribed from a file, printed at their source's precision) carries the tag `exact-numbers`;
cells nbval does not compare (`nbval-ignore-output`, `nbval-skip`) are not checked either.

The lint is the cheap guard `make test` runs (tests/test_notebooks.py). The direct check, for a notebook
you regenerated: run nbval as if on another CPU, without the vector paths this one has (torch's ATen
kernels and numpy's SIMD loops), and with another thread count:

  OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=default \
  NPY_DISABLE_CPU_FEATURES="AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX2 FMA3" \
  .venv/bin/python -m pytest -q -p no:cacheprovider --nbval --nbval-current-env \
      --nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks/NN_name.ipynb
"""
from __future__ import annotations

import configparser
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
SANITIZE_CFG = NB_DIR / "nbval_sanitize.cfg"

# 4 significant digits = a relative precision of 1e-4: float32 reductions summed in another order differ
# around 1e-6 relative, and a few steps of training or a loop of float32 updates amplify that towards
# 1e-5 (issue 11's AMD-vs-Intel failures: 3296.0306 vs 3296.0309, 8 digits, differing in the 7th).
MAX_SIGNIFICANT = 4
# Below 1e-5 a computed difference is float32 noise (eps 1.2e-7, times the magnitudes it came from):
# print the bound it is under, with one digit.
NOISE_FLOOR = 1e-5
NOISE_FLOOR_SIGNIFICANT = 1
EXACT_TAG = "exact-numbers"
UNCOMPARED_TAGS = ("nbval-ignore-output", "nbval-skip", "raises-exception")
# What nbval leaves out of its comparison (nbval.plugin.IPyNbFile.skip_compare, images without --nbdime).
UNCOMPARED_MIME = ("image/png", "image/jpeg", "image/svg+xml", "application/vnd.jupyter.widget-view+json")

# A float: a decimal point or an exponent; not part of a word, a version (1.2.3) or an id (6a4e6b6).
FLOAT = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+(?=[eE][-+]?\d))(?:[eE][-+]?\d+)?(?!\d|\.\d)")
HTML_TAG = re.compile(r"<[^>]+>")


@dataclass(frozen=True)
class Flag:
    """One printed float that breaks the rule: where it is and why."""

    notebook: str
    cell: int
    number: str
    reason: str

    def __str__(self) -> str:
        return f"{self.notebook} code cell {self.cell}: {self.number} ({self.reason})"


def sanitize_patterns(path: Path = SANITIZE_CFG) -> list[tuple[re.Pattern, str]]:
    """The (regex, replacement) pairs of an nbval sanitize file, in order (as nbval applies them)."""
    cfg = configparser.ConfigParser(interpolation=None)
    if not cfg.read(path):
        raise FileNotFoundError(f"nbval sanitize file not found: {path}")
    out = []
    for section in cfg.sections():
        if "regex" not in cfg[section] or "replace" not in cfg[section]:
            raise ValueError(f"{path}: section [{section}] needs both 'regex' and 'replace'")
        out.append((re.compile(cfg[section]["regex"]), cfg[section]["replace"]))
    return out


def significant_digits(token: str) -> int:
    """Significant digits as printed: '0.000016' → 2, '3296.0306' → 8, '1.50e-05' → 3, '100.0' → 4."""
    mantissa = re.split("[eE]", token.lstrip("+-"))[0].replace(".", "")
    return len(mantissa.lstrip("0"))


def check_number(token: str) -> str | None:
    """Why a printed float breaks the rule, or None."""
    digits, value = significant_digits(token), abs(float(token))
    if 0 < value < NOISE_FLOOR and digits > NOISE_FLOOR_SIGNIFICANT:
        return f"{digits} significant digits below {NOISE_FLOOR:g}: print the bound"
    if digits > MAX_SIGNIFICANT:
        return f"{digits} significant digits > {MAX_SIGNIFICANT}"
    return None


def compared_texts(cell) -> list[str]:
    """The text nbval compares for one code cell's outputs (HTML tags dropped: the numbers stay)."""
    texts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            texts.append(out.get("text", ""))
        for mime, data in out.get("data", {}).items():
            if mime in UNCOMPARED_MIME or not isinstance(data, str):
                continue
            texts.append(HTML_TAG.sub(" ", data) if mime == "text/html" else data)
    return texts


def lint_notebook(path: Path, patterns: list[tuple[re.Pattern, str]] | None = None) -> list[Flag]:
    """Every printed float of a notebook's stored outputs that breaks the rule.

    Args:
        path: an .ipynb with stored outputs.
        patterns: the sanitizer's substitutions (default: notebooks/nbval_sanitize.cfg).
    """
    patterns = sanitize_patterns() if patterns is None else patterns
    nb = nbformat.read(path, as_version=4)
    flags = []
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code_cells, start=1):
        tags = cell.metadata.get("tags", [])
        if EXACT_TAG in tags or any(t in tags for t in UNCOMPARED_TAGS):
            continue
        for text in compared_texts(cell):
            for regex, replace in patterns:
                text = regex.sub(replace, text)
            for m in FLOAT.finditer(text):
                reason = check_number(m.group())
                if reason:
                    flags.append(Flag(path.stem, i, m.group(), reason))
    return flags


def main(paths: list[str]) -> int:
    files = [Path(p) for p in paths] or sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
    flags = [f for p in files for f in lint_notebook(p)]
    for f in flags:
        print(f)
    print(f"{len(flags)} printed floats break the rule in {len(files)} notebooks", file=sys.stderr)
    return 1 if flags else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
