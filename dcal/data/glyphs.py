"""Glyphs: the binary patterns drawn inside the discriminative part (and the distractor marks).

Every glyph is a 5x5 binary grid with exactly :data:`INK_CELLS` inked cells, so that all classes put
the same amount of ink on the image (colour histograms then carry no class information). Every glyph is
left-right mirror symmetric, so that horizontal-flip augmentation never turns one class into another.

Three disjoint glyph families exist:

* the *benchmark* set: hand-drawn shapes (plus, cross, tee, ...), up to 12 classes;
* the *pretrain* set: seeded random symmetric 9-cell patterns, kept far (Hamming distance) from every
  benchmark glyph and from every one-cell shift of one, so a pre-trained backbone has never seen a
  benchmark class;
* the *decoy* sets: more seeded random symmetric 9-cell patterns, far from every class glyph of both
  families, one set per family (the benchmark's decoys are never seen in pre-training). A decoy looks like
  a class mark (same plate, same ink area, same stroke grid) but carries no class information.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["GRID", "INK_CELLS", "BENCHMARK_GLYPHS", "benchmark_glyphs", "pretrain_glyphs", "decoy_glyphs",
           "glyph_coverage"]

GRID = 5  # glyph grid side, in cells
INK_CELLS = 9  # inked cells per glyph: equal for all glyphs so ink area carries no class information

# Ordered so that the first N are the most mutually distinct (the default spec uses the first 10).
_BENCHMARK_ART: dict[str, str] = {
    "plus": "..#.. ..#.. ##### ..#.. ..#..",
    "cross": "#...# .#.#. ..#.. .#.#. #...#",
    "tee": "##### ..#.. ..#.. ..#.. ..#..",
    "block": "..... .###. .###. .###. .....",
    "dots": "#.#.# ..... #.#.# ..... #.#.#",
    "vee": "#...# #...# .#.#. .#.#. ..#..",
    "hbars": ".###. ..... .###. ..... .###.",
    "vbars": "..... #.#.# #.#.# #.#.# .....",
    "diamond": "..#.. .#.#. #.#.# .#.#. ..#..",
    "arch": "##### #...# #...# ..... .....",
    "lambda": "..#.. .#.#. .#.#. #...# #...#",
    "wye": "#...# .#.#. ..#.. ..#.. .###.",
}


def _parse(art: str) -> np.ndarray:
    """Parse 5 space-separated rows of '#'/'.' into a (GRID, GRID) bool array."""
    rows = art.split()
    grid = np.array([[c == "#" for c in row] for row in rows], dtype=bool)  # (GRID, GRID)
    if grid.shape != (GRID, GRID):
        raise ValueError(f"glyph art must be {GRID}x{GRID}, got {grid.shape}: {art!r}")
    return grid


BENCHMARK_GLYPHS: dict[str, np.ndarray] = {name: _parse(art) for name, art in _BENCHMARK_ART.items()}


def _check_glyph(name: str, g: np.ndarray) -> None:
    """Raise if a glyph breaks the equal-ink or mirror-symmetry invariants."""
    if int(g.sum()) != INK_CELLS:
        raise ValueError(f"glyph {name!r} has {int(g.sum())} inked cells, expected {INK_CELLS}")
    if not np.array_equal(g, g[:, ::-1]):
        raise ValueError(f"glyph {name!r} is not left-right symmetric (horizontal flip would change it)")


for _name, _g in BENCHMARK_GLYPHS.items():
    _check_glyph(_name, _g)


def benchmark_glyphs(num_classes: int) -> tuple[list[str], np.ndarray]:
    """The first ``num_classes`` benchmark glyphs.

    Args:
        num_classes: how many classes (1..12).

    Returns:
        (names, glyphs) with glyphs a (num_classes, GRID, GRID) bool array.
    """
    if not 1 <= num_classes <= len(BENCHMARK_GLYPHS):
        raise ValueError(f"benchmark family has at most {len(BENCHMARK_GLYPHS)} glyph classes, got num_classes={num_classes}")
    names = list(BENCHMARK_GLYPHS)[:num_classes]
    return names, np.stack([BENCHMARK_GLYPHS[n] for n in names])


def _shifted(g: np.ndarray) -> list[np.ndarray]:
    """The glyph and its one-cell shifts (cells pushed off the grid are dropped)."""
    out = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            s = np.zeros_like(g)
            ys, xs = np.nonzero(g)
            ys, xs = ys + dy, xs + dx
            keep = (ys >= 0) & (ys < GRID) & (xs >= 0) & (xs < GRID)
            s[ys[keep], xs[keep]] = True
            out.append(s)
    return out


_PRETRAIN_POOL_SEED = 20220502  # fixed: the pretrain glyph set is a property of the family, not of a run
_PRETRAIN_MAX = 48
_MIN_DIST_PRETRAIN = 6  # Hamming distance between two pretrain glyphs
_MIN_DIST_BENCHMARK = 6  # Hamming distance from any benchmark glyph and its one-cell shifts: other shapes


_HALF_CELLS = [(r, c) for r in range(GRID) for c in range(GRID // 2)]  # left half; mirrored to the right


def _random_symmetric_glyph(rng: np.random.Generator) -> np.ndarray:
    """A random left-right symmetric glyph with INK_CELLS cells: mirrored pairs plus an odd number of
    centre-column cells (INK_CELLS = 2 * pairs + centre)."""
    n_centre = int(rng.choice([1, 3, 5]))
    n_pairs = (INK_CELLS - n_centre) // 2
    g = np.zeros((GRID, GRID), dtype=bool)
    for i in rng.choice(len(_HALF_CELLS), size=n_pairs, replace=False):
        r, c = _HALF_CELLS[i]
        g[r, c] = g[r, GRID - 1 - c] = True
    g[rng.choice(GRID, size=n_centre, replace=False), GRID // 2] = True
    return g


def _draw_pool(seed: int, need: int, forbidden: list[np.ndarray], min_forbidden: int, min_pool: int,
               name: str) -> np.ndarray:
    """(need, GRID, GRID) bool: random symmetric glyphs drawn in order from ``default_rng(seed)``, each kept
    when it is at Hamming distance >= min_forbidden from every forbidden glyph and >= min_pool from those
    kept before it."""
    rng = np.random.default_rng(seed)
    pool: list[np.ndarray] = []
    for _ in range(200_000):
        g = _random_symmetric_glyph(rng)
        if any(int((g ^ f).sum()) < min_forbidden for f in forbidden):
            continue
        if any(int((g ^ p).sum()) < min_pool for p in pool):
            continue
        pool.append(g)
        if len(pool) == need:
            break
    if len(pool) < need:
        raise RuntimeError(f"could only build {len(pool)} {name} glyphs, need {need}")
    for i, g in enumerate(pool):
        _check_glyph(f"{name}_{i}", g)
    return np.stack(pool)


@functools.lru_cache(maxsize=1)
def _pretrain_pool() -> np.ndarray:
    """(_PRETRAIN_MAX, GRID, GRID) bool: deterministic random symmetric 9-cell glyphs."""
    forbidden = [s for g in BENCHMARK_GLYPHS.values() for s in _shifted(g)]
    return _draw_pool(_PRETRAIN_POOL_SEED, _PRETRAIN_MAX, forbidden, _MIN_DIST_BENCHMARK, _MIN_DIST_PRETRAIN,
                      "pretrain")


def pretrain_glyphs(num_classes: int) -> tuple[list[str], np.ndarray]:
    """The first ``num_classes`` pretrain glyphs (disjoint from the benchmark set).

    Args:
        num_classes: how many classes (1..48).

    Returns:
        (names, glyphs) with glyphs a (num_classes, GRID, GRID) bool array.
    """
    if not 1 <= num_classes <= _PRETRAIN_MAX:
        raise ValueError(f"pretrain family has at most {_PRETRAIN_MAX} glyph classes, got num_classes={num_classes}")
    return [f"pattern{i:02d}" for i in range(num_classes)], _pretrain_pool()[:num_classes].copy()


_DECOY_POOL_SEED = 20220503
_DECOYS_PER_FAMILY = 16
_DECOY_FAMILIES = ("benchmark", "pretrain")  # the order of the sets in the pool
_MIN_DIST_DECOY = 4  # Hamming distance from every class glyph of both families, and between decoys


@functools.lru_cache(maxsize=1)
def _decoy_pool() -> np.ndarray:
    """(2 * _DECOYS_PER_FAMILY, GRID, GRID) bool: deterministic random symmetric 9-cell decoy glyphs."""
    forbidden = [s for g in BENCHMARK_GLYPHS.values() for s in _shifted(g)] + list(_pretrain_pool())
    need = _DECOYS_PER_FAMILY * len(_DECOY_FAMILIES)
    return _draw_pool(_DECOY_POOL_SEED, need, forbidden, _MIN_DIST_DECOY, _MIN_DIST_DECOY, "decoy")


def decoy_glyphs(family: str) -> np.ndarray:
    """The decoy glyphs of ``family`` (``"benchmark"`` or ``"pretrain"``): (16, GRID, GRID) bool.

    Disjoint from every class glyph of both families and from the other family's decoys.
    """
    if family not in _DECOY_FAMILIES:
        raise ValueError(f"decoy_glyphs: family must be one of {_DECOY_FAMILIES}, got {family!r}")
    i = _DECOY_FAMILIES.index(family)
    return _decoy_pool()[i * _DECOYS_PER_FAMILY:(i + 1) * _DECOYS_PER_FAMILY].copy()


_SUPERSAMPLE = 4  # sub-pixel samples per axis: anti-aliased, rotation-exact glyph strokes


@functools.lru_cache(maxsize=8)
def _plate_offsets(size: int) -> np.ndarray:
    """(size*size*S*S, 2) sub-pixel sample positions (x, y) relative to the plate centre."""
    sub = (np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - size / 2.0  # (size*S,)
    yy, xx = np.meshgrid(sub, sub, indexing="ij")  # (size*S, size*S)
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def glyph_coverage(glyphs: np.ndarray, size: int, tilts: np.ndarray) -> np.ndarray:
    """Ink coverage of glyphs drawn on square plates (batched).

    The glyph occupies the plate minus a margin of about size/7 px on each side (so a tilted glyph stays
    inside the plate) and is rotated by its tilt about the plate centre; each pixel averages
    ``_SUPERSAMPLE``^2 sub-samples (anti-aliasing).

    Args:
        glyphs: (N, GRID, GRID) bool.
        size: plate side in pixels.
        tilts: (N,) rotations in radians (counter-clockwise on screen).

    Returns:
        (N, size, size) float32 coverage in [0, 1].
    """
    glyphs = np.asarray(glyphs, dtype=bool).reshape(-1, GRID, GRID)  # (N, GRID, GRID)
    tilts = np.asarray(tilts, dtype=np.float32).reshape(-1, 1)  # (N, 1)
    margin = max(1, round(size / 7))
    cell = (size - 2 * margin) / GRID
    xy = _plate_offsets(size).astype(np.float32)  # (P, 2), P = (size * S)^2
    c, s = np.cos(tilts), np.sin(tilts)
    # inverse rotation maps screen samples into each glyph's own frame (y points down on screen)
    u = c * xy[:, 0] - s * xy[:, 1]  # (N, P)
    v = s * xy[:, 0] + c * xy[:, 1]  # (N, P)
    col = np.floor(u / cell + GRID / 2).astype(np.int64)
    row = np.floor(v / cell + GRID / 2).astype(np.int64)
    inside = (col >= 0) & (col < GRID) & (row >= 0) & (row < GRID)
    flat = glyphs.reshape(len(glyphs), GRID * GRID)  # (N, 25)
    idx = np.clip(row, 0, GRID - 1) * GRID + np.clip(col, 0, GRID - 1)  # (N, P)
    ink = np.take_along_axis(flat, idx, axis=1) & inside  # (N, P)
    S = _SUPERSAMPLE
    return ink.reshape(-1, size, S, size, S).mean(axis=(2, 4), dtype=np.float32)  # average the sub-samples
