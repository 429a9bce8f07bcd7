"""Rendering the images: backgrounds, the object, its part mark and the distractors, in chunks of images with
vectorised numpy (`generate`)."""
from __future__ import annotations

import numpy as np

from ..glyphs import decoy_glyphs, glyph_coverage
from .spec import _FAMILIES, SyntheticData, SyntheticSpec

# Images are drawn in chunks of _CHUNK at once (numpy over the batch axis): a per-image Python loop is
# ~10x slower. The chunk size is part of the random stream, so it is a constant, not a parameter.
_CHUNK = 256
_TILT_STEP_DEG = 0.5  # glyph tilts are drawn from a grid this fine (pre-rendered once per dataset)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV arrays (...,) in [0, 1] -> (..., 3) float32 RGB."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def _rand_colours(rng: np.random.Generator, n: int, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """(n, 3) random colours: uniform hue, saturation and value in the given ranges."""
    return _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(*sat, n), rng.uniform(*val, n))


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """img += alpha * (colour - img), in place. img (B, H, W, 3), alpha (B, H, W), colour (B, 3) or (B, H, W, 3)."""
    if colour.ndim == 2:
        colour = colour[:, None, None, :]  # (B, 1, 1, 3)
    img += alpha[..., None] * (colour - img)


def _col(x: np.ndarray) -> np.ndarray:
    """(B,) -> (B, 1, 1): per-image parameter broadcast over the pixel grid."""
    return np.asarray(x, np.float32)[:, None, None]


def _ellipse_alpha(px: np.ndarray, py: np.ndarray, cx: np.ndarray, cy: np.ndarray, a: np.ndarray, b: np.ndarray,
                   theta: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (B, H, W) of ellipses with semi-axes a (along theta) and b; params (B,)."""
    dx, dy = px - _col(cx), py - _col(cy)  # (B, H, W)
    c, s = _col(np.cos(theta)), _col(np.sin(theta))
    u, v = dx * c + dy * s, -dx * s + dy * c  # ellipse frame
    d = np.sqrt((u / _col(a)) ** 2 + (v / _col(b)) ** 2)  # 1 on the outline
    rho = np.sqrt(u * u + v * v)
    r_dir = np.where(d > 1e-6, rho / np.maximum(d, 1e-6), _col(np.minimum(a, b)))  # outline radius this way
    return np.clip(0.5 - (d - 1.0) * r_dir, 0.0, 1.0)  # ~ signed distance to the outline, in px


def _segment_alpha(px: np.ndarray, py: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (B, H, W) of line segments p0 -> p1 ((B, 2) each) of widths (B,)."""
    d = p1 - p0  # (B, 2)
    x0, y0, dx, dy = _col(p0[:, 0]), _col(p0[:, 1]), _col(d[:, 0]), _col(d[:, 1])
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    dist = np.hypot(px - x0 - t * dx, py - y0 - t * dy)
    return np.clip(_col(width) / 2 + 0.5 - dist, 0.0, 1.0)


def _backgrounds(rng: np.random.Generator, spec: SyntheticSpec, B: int, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) float32 low-contrast clutter: base colour, blobs, faint rectangles and lines."""
    L = spec.img_size
    img = np.empty((B, L, L, 3), np.float32)
    img[:] = _rand_colours(rng, B, (0.05, 0.35), (0.35, 0.75))[:, None, None, :]
    K = spec.clutter_blobs
    if K:
        coords = px[0, 0]  # (L,) pixel centres, the same on both axes
        cx, cy = rng.uniform(-0.1 * L, 1.1 * L, size=(2, B, K, 1))
        sigma = rng.uniform(0.05, 0.2, size=(B, K, 1)) * L
        amp = rng.normal(0.0, 0.12, size=(B, K, 3)).astype(np.float32)
        gx = np.exp(-((coords - cx) ** 2) / (2 * sigma**2)).astype(np.float32)  # (B, K, L)
        gy = np.exp(-((coords - cy) ** 2) / (2 * sigma**2)).astype(np.float32)  # (B, K, L)
        blobs = gy[:, :, :, None] * gx[:, :, None, :]  # (B, K, L, L): separable Gaussians
        img += (blobs.reshape(B, K, L * L).transpose(0, 2, 1) @ amp).reshape(B, L, L, 3)
    # Faint rectangles and lines, composited in ONE pass (img <- img (1 - sum a) + sum a_k c_k): they are
    # faint and rarely overlap, so order does not matter visibly, and one pass is ~5x cheaper than K blends.
    alphas, colours = [], []
    for _ in range(spec.clutter_rects):
        w, h = rng.uniform(0.06, 0.25, size=(2, B)) * L
        x0, y0 = rng.uniform(-0.1 * L, L, size=(2, B))
        inside = (px >= _col(x0)) & (px < _col(x0 + w)) & (py >= _col(y0)) & (py < _col(y0 + h))
        alphas.append(inside * _col(rng.uniform(0.1, 0.3, B)))
        colours.append(_rand_colours(rng, B, (0.0, 0.6), (0.2, 0.9)))
    for _ in range(spec.clutter_lines):
        p0, p1 = rng.uniform(-0.1 * L, 1.1 * L, size=(2, B, 2))
        alphas.append(_segment_alpha(px, py, p0, p1, rng.uniform(0.8, 2.0, B)) * _col(rng.uniform(0.15, 0.35, B)))
        colours.append(_rand_colours(rng, B, (0.0, 0.6), (0.2, 0.9)))
    if alphas:
        a = np.stack(alphas, axis=1).astype(np.float32).reshape(B, len(alphas), L * L)  # (B, K, L*L)
        total = a.sum(axis=1, keepdims=True)  # (B, 1, L*L)
        a /= np.maximum(total, 1.0)  # where layers pile up past full opacity, share it
        total = np.minimum(total, 1.0).reshape(B, L, L, 1)
        img *= 1.0 - total
        img += (a.transpose(0, 2, 1) @ np.stack(colours, axis=1)).reshape(B, L, L, 3)  # (B, L*L, K) @ (B, K, 3)
    return img


def _geometry(spec: SyntheticSpec, scale: np.ndarray) -> dict[str, np.ndarray]:
    """Object part sizes in px ((B,) each): body ellipse, tail ellipse behind it, head disc in front."""
    L, S = spec.img_size, spec.part_size
    a, b = 0.22 * L * scale, 0.11 * L * scale
    head_r = np.maximum(0.14 * L * scale, 0.75 * S)  # the head stays a visible rim around the mark
    tail_a, tail_b = 0.35 * a, 0.45 * b
    return {"a": a, "b": b, "head_r": head_r, "head_off": a + 0.3 * head_r,
            "tail_a": tail_a, "tail_b": tail_b, "tail_off": a + 0.6 * tail_a}


def _ellipse_half_extent(a: np.ndarray, b: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(B, 2) half width/height of the axis-aligned boxes of rotated ellipses."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.sqrt((a * c) ** 2 + (b * s) ** 2), np.sqrt((a * s) ** 2 + (b * c) ** 2)], axis=1)


def _object_extent(g: dict[str, np.ndarray], theta: np.ndarray, part_size: int,
                   grid: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), (B, 2) each: the objects' boxes relative to the body centres."""
    axis = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # (B, 2)
    head = g["head_off"][:, None] * axis
    comps = [
        (np.zeros_like(axis), _ellipse_half_extent(g["a"], g["b"], theta)),
        (-g["tail_off"][:, None] * axis, _ellipse_half_extent(g["tail_a"], g["tail_b"], theta)),
        (head, np.repeat(g["head_r"][:, None], 2, axis=1)),
        (head, np.full_like(axis, part_size / 2 + grid / 2)),  # the mark plate, snapped to its grid
    ]
    lo = np.min([c - h for c, h in comps], axis=0)
    hi = np.max([c + h for c, h in comps], axis=0)
    return lo, hi


def _mark_boxes(centres: np.ndarray, size: int, grid: int = 1) -> np.ndarray:
    """(N, 4) size x size boxes centred on centres (N, 2), corners snapped to multiples of `grid` px."""
    tl = np.rint((centres - size / 2.0) / grid) * grid
    return np.concatenate([tl, tl + size], axis=1).astype(np.float32)


def _clear_of(boxes: np.ndarray, taken: np.ndarray, gap: float = 1.0) -> np.ndarray:
    """(N,) bool: boxes (N, 4) keeping at least ``gap`` px from all boxes in ``taken`` (T, 4)."""
    b, t = boxes[:, None, :], taken[None, :, :]  # (N, 1, 4), (1, T, 4)
    hit = (b[..., 0] < t[..., 2] + gap) & (t[..., 0] < b[..., 2] + gap) & \
          (b[..., 1] < t[..., 3] + gap) & (t[..., 1] < b[..., 3] + gap)  # (N, T)
    return ~hit.any(axis=1)


def _place_distractors(rng: np.random.Generator, spec: SyntheticSpec, centre: np.ndarray, theta: float,
                       a: float, b: float, part_box: np.ndarray) -> np.ndarray:
    """(M, 4) mark boxes, each on the body (prob. distractor_on_body_prob) or the background, clear of the
    part box and of each other."""
    L, S = spec.img_size, spec.part_size
    axis, lateral = np.array([np.cos(theta), np.sin(theta)]), np.array([-np.sin(theta), np.cos(theta)])
    taken = [part_box]
    n = 32  # candidates drawn at once; the first valid one wins
    for _ in range(spec.num_distractors):
        on_body = rng.random() < spec.distractor_on_body_prob
        for attempt in range(50):
            if on_body and attempt < 4:  # the body may be too crowded: then the background
                c = centre + rng.uniform(-1.2 * a, 0.3 * a, (n, 1)) * axis + rng.uniform(-0.4, 0.4, (n, 1)) * b * lateral
            else:
                c = rng.uniform(S / 2, L - S / 2, size=(n, 2))
            boxes = _mark_boxes(c, S, spec.mark_grid)  # (n, 4)
            ok = (boxes[:, :2] >= 0).all(1) & (boxes[:, 2:] <= L).all(1) & _clear_of(boxes, np.stack(taken))
            if ok.any():
                taken.append(boxes[np.argmax(ok)])
                break
        else:
            raise RuntimeError(f"could not place a distractor mark without overlap ({spec})")
    return np.asarray(taken[1:], dtype=np.float32).reshape(spec.num_distractors, 4)  # (M, 4), M may be 0


def _coverage_table(spec: SyntheticSpec, glyphs: np.ndarray) -> np.ndarray:
    """(C, T, S, S) ink coverage of every glyph at every tilt level (tilts quantised to _TILT_STEP_DEG).

    Drawn once per dataset: rendering each mark from scratch costs more than the rest of the image.
    """
    q = int(round(spec.glyph_tilt_deg / _TILT_STEP_DEG))
    tilts = np.deg2rad(np.arange(-q, q + 1) * _TILT_STEP_DEG)  # (T,)
    C, T = len(glyphs), len(tilts)
    cov = glyph_coverage(np.repeat(glyphs, T, axis=0), spec.part_size, np.tile(tilts, C))  # (C*T, S, S)
    return cov.reshape(C, T, spec.part_size, spec.part_size)


def _render_chunk(rng: np.random.Generator, spec: SyntheticSpec, coverage_table: np.ndarray, labels: np.ndarray,
                  px: np.ndarray, py: np.ndarray) -> dict[str, np.ndarray]:
    """Draw B = len(labels) images: background, object (pose, position, scale, colours), marks, noise.

    ``coverage_table`` (C, T, S, S) holds each glyph pre-drawn at each tilt level.
    """
    B, L, S, M = len(labels), spec.img_size, spec.part_size, spec.num_distractors
    img = _backgrounds(rng, spec, B, px, py)

    theta = rng.uniform(0.0, 2 * np.pi, B)  # pose: direction of the head, screen coordinates (y down)
    g = _geometry(spec, rng.uniform(*spec.scale_range, B))
    lo, hi = _object_extent(g, theta, S, spec.mark_grid)  # (B, 2) each
    if np.any(hi - lo > L - 2):
        raise ValueError(f"object does not fit in {L} px (extent up to {(hi - lo).max():.1f}); "
                         "reduce part_size or scale_range")
    centre = (1 - lo) + rng.uniform(0, 1, (B, 2)) * ((L - 1 - hi) - (1 - lo))  # (B, 2): object inside the image
    axis = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # (B, 2)
    tail_c, head_c = centre - g["tail_off"][:, None] * axis, centre + g["head_off"][:, None] * axis

    body_rgb = _rand_colours(rng, B, (0.3, 0.8), (0.3, 0.75))  # (B, 3)
    head_rgb = 0.5 * body_rgb + 0.5 * _rand_colours(rng, B, (0.3, 0.9), (0.2, 0.9))
    lateral = (-(px - _col(centre[:, 0])) * _col(axis[:, 1]) + (py - _col(centre[:, 1])) * _col(axis[:, 0])) / _col(g["b"])
    shade = (1.0 + 0.15 * np.clip(lateral, -1.5, 1.5))[..., None]  # (B, H, W, 1): a hint of 3-D lighting
    a_tail = _ellipse_alpha(px, py, tail_c[:, 0], tail_c[:, 1], g["tail_a"], g["tail_b"], theta)
    a_body = _ellipse_alpha(px, py, centre[:, 0], centre[:, 1], g["a"], g["b"], theta)
    a_head = _ellipse_alpha(px, py, head_c[:, 0], head_c[:, 1], g["head_r"], g["head_r"], theta)
    _blend(img, a_tail, 0.8 * body_rgb[:, None, None, :] * shade)
    _blend(img, a_body, body_rgb[:, None, None, :] * shade)
    _blend(img, a_head, head_rgb[:, None, None, :] * shade)

    part_boxes = _mark_boxes(head_c, S, spec.mark_grid)
    shift = np.clip(-part_boxes[:, :2], 0, None) - np.clip(part_boxes[:, 2:] - L, 0, None)  # no-op by the extent check
    part_boxes += np.concatenate([shift, shift], axis=1)
    dist_boxes = np.stack([_place_distractors(rng, spec, centre[i], theta[i], g["a"][i], g["b"][i], part_boxes[i])
                           for i in range(B)]).reshape(B, M, 4)
    C = spec.num_classes  # the coverage table holds the C class glyphs, then the family's decoys
    if spec.distractor_glyphs == "decoy":
        dist_labels = C + rng.integers(len(coverage_table) - C, size=(B, M))  # a decoy glyph, uniform
    else:
        # "random" and "class" draw exactly what generator version 1 drew, so their images (and the shipped
        # backbone's pre-training data) are unchanged
        dist_labels = rng.integers(C, size=(B, M))  # a class glyph, uniform, independent of the label
        if spec.distractor_glyphs == "class":
            dist_labels = np.repeat(labels[:, None], M, axis=1)  # (B, M): copies of the class glyph

    # marks: part first, then distractors; same colour and tilt distributions for all of them
    boxes = np.concatenate([part_boxes[:, None], dist_boxes], axis=1).reshape(B * (M + 1), 4)
    glyph_ids = np.concatenate([labels[:, None], dist_labels], axis=1).reshape(-1)
    tilt_ids = rng.integers(0, coverage_table.shape[1], len(glyph_ids))
    cov = coverage_table[glyph_ids, tilt_ids][..., None]  # (N, S, S, 1)
    plate = _rand_colours(rng, len(glyph_ids), (0.0, 0.45), (0.72, 1.0))[:, None, None, :]  # light plate
    ink = _rand_colours(rng, len(glyph_ids), (0.0, 0.8), (0.0, 0.32))[:, None, None, :]  # dark ink
    marks = plate * (1.0 - cov) + ink * cov  # (N, S, S, 3)
    for k, (x0, y0) in enumerate(boxes[:, :2].astype(np.int64)):
        img[k // (M + 1), y0:y0 + S, x0:x0 + S] = marks[k]

    mask = np.maximum(np.maximum(a_tail, a_body), a_head) > 0.5  # (B, H, W)
    cols, rows = mask.any(axis=1), mask.any(axis=2)  # (B, W), (B, H)
    if not (cols.any(axis=1).all() and rows.any(axis=1).all()):
        raise RuntimeError(f"an object covers no pixel ({spec})")
    obj = np.stack([cols.argmax(1), rows.argmax(1), L - cols[:, ::-1].argmax(1), L - rows[:, ::-1].argmax(1)], axis=1)
    obj = np.concatenate([np.minimum(obj[:, :2], part_boxes[:, :2]), np.maximum(obj[:, 2:], part_boxes[:, 2:])], axis=1)

    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(spec.noise_std)
    return {
        "images": np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8),
        "part_boxes": part_boxes, "object_boxes": obj.astype(np.float32),
        "distractor_boxes": dist_boxes.astype(np.float32), "distractor_labels": dist_labels.astype(np.int64),
        "poses": theta.astype(np.float32),
    }


def generate(spec: SyntheticSpec) -> SyntheticData:
    """Generate the dataset described by ``spec`` (deterministic; no caching).

    The arrays hold the train split first (class-balanced, shuffled), then the test split.
    """
    names, glyphs = spec.glyph_set()
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _FAMILIES[spec.family]]))
    C, L = spec.num_classes, spec.img_size
    labels = np.concatenate([
        rng.permutation(np.repeat(np.arange(C), spec.train_per_class)),
        rng.permutation(np.repeat(np.arange(C), spec.test_per_class)),
    ]).astype(np.int64)
    n = len(labels)
    centres = np.arange(L, dtype=np.float32) + 0.5
    py, px = np.meshgrid(centres, centres, indexing="ij")  # (L, L) pixel centres
    px, py = px[None], py[None]  # (1, L, L): broadcast over the chunk
    table = _coverage_table(spec, np.concatenate([glyphs, decoy_glyphs(spec.family)]))  # (C + D, T, S, S)
    chunks = [_render_chunk(rng, spec, table, labels[i:i + _CHUNK], px, py) for i in range(0, n, _CHUNK)]
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return SyntheticData(labels=labels, is_train=np.arange(n) < C * spec.train_per_class,
                         class_names=list(names), spec=spec, **out)
