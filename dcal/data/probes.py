"""Linear baselines that show a dataset is *fine-grained*: global features fail, the part succeeds.

* :func:`downsampled_features` — the whole image at 16x16x3 (what a coarse global model sees);
* :func:`colour_histogram_features` — per-channel colour histograms (what colour statistics say);
* :func:`part_crop_features` — the pixels inside the part box (the right local evidence).

:func:`linear_probe` fits a multinomial logistic regression on train features and scores the test split.
Everything is plain numpy/torch (no scikit-learn).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .synthetic import SyntheticData

__all__ = [
    "downsampled_features", "colour_histogram_features", "part_crop_features", "linear_probe",
    "baseline_accuracies",
]


def downsampled_features(images: np.ndarray, size: int = 16) -> np.ndarray:
    """(n, size*size*3) float32: images (n, H, W, 3) uint8 area-averaged to size x size."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (n, 3, H, W)
    x = F.adaptive_avg_pool2d(x, size)  # (n, 3, size, size)
    return x.reshape(len(images), -1).numpy()


def colour_histogram_features(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """(n, 3*bins) float32: per-channel histograms of images (n, H, W, 3) uint8, each summing to 1."""
    n = len(images)
    pixels = images.reshape(n, -1, 3)  # (n, H*W, 3)
    offsets = np.arange(3) * bins  # channel c -> bins [c*bins, (c+1)*bins)
    # one image at a time: a batched int64 copy of all pixels would be ~100x the images' size
    counts = np.stack([np.bincount(((p.astype(np.int64) * bins) // 256 + offsets).ravel(), minlength=3 * bins)
                       for p in pixels])  # (n, 3*bins)
    return (counts / float(pixels.shape[1])).astype(np.float32)


def part_crop_features(images: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(n, size*size) float32: grey-level crop of each box, resized to size x size, standardised per crop.

    Standardising each crop removes the (random, class-independent) plate and ink colours, leaving the
    glyph's shape.

    Args:
        images: (n, H, W, 3) uint8.
        boxes: (n, 4) x0 y0 x1 y1 pixel boxes (rounded to whole pixels).
        size: side of the resized crop.
    """
    out = np.empty((len(images), size * size), np.float32)
    for i, (img, b) in enumerate(zip(images, boxes)):
        x0, y0, x1, y1 = (int(round(float(v))) for v in b)
        crop = torch.from_numpy(img[y0:y1, x0:x1].astype(np.float32).mean(axis=2))[None, None]  # (1, 1, h, w)
        if crop.shape[-2:] != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        v = crop.reshape(-1).numpy()
        out[i] = (v - v.mean()) / (v.std() + 1e-6)
    return out


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 num_classes: int, steps: int = 100, weight_decay: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Multinomial logistic regression (full-batch L-BFGS) on standardised features.

    Args:
        x_train, x_test: (n, d) features; y_train, y_test: (n,) int labels.
        num_classes: number of classes (chance = 1 / num_classes).
        steps: L-BFGS iterations.
        weight_decay: L2 penalty on the weights (keeps the fit from memorising the train split).

    Returns:
        {"train_acc", "test_acc", "chance"}.
    """
    torch.manual_seed(seed)
    xt = torch.as_tensor(x_train, dtype=torch.float32)
    xe = torch.as_tensor(x_test, dtype=torch.float32)
    mean, std = xt.mean(0), xt.std(0) + 1e-6  # train statistics only: no test leakage
    xt, xe = (xt - mean) / std, (xe - mean) / std
    yt, ye = torch.as_tensor(y_train, dtype=torch.long), torch.as_tensor(y_test, dtype=torch.long)
    w = torch.zeros(xt.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = ((xt @ w + b).argmax(1) == yt).float().mean().item()
        test_acc = ((xe @ w + b).argmax(1) == ye).float().mean().item()
    return {"train_acc": train_acc, "test_acc": test_acc, "chance": 1.0 / num_classes}


def baseline_accuracies(data: SyntheticData, part_size: int | None = None) -> dict[str, float]:
    """Test accuracy of the three linear baselines on a synthetic dataset, and chance.

    Returns:
        {"downsampled_16": ..., "colour_histogram": ..., "part_crop": ..., "chance": 1 / num_classes}.
    """
    size = part_size or (data.spec.part_size if data.spec is not None else 14)
    tr, te, y, C = data.is_train, ~data.is_train, data.labels, data.num_classes
    feats = {
        "downsampled_16": downsampled_features(data.images, 16),  # (n, 768)
        "colour_histogram": colour_histogram_features(data.images, 16),  # (n, 48)
        "part_crop": part_crop_features(data.images, data.part_boxes, size),  # (n, size*size)
    }
    out = {k: linear_probe(x[tr], y[tr], x[te], y[te], C)["test_acc"] for k, x in feats.items()}
    out["chance"] = 1.0 / C
    return out
