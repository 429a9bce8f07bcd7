"""Which patches GLCA selects over an eval batch, and whether that selection means anything.

The seed system replaced a missing rollout by ``torch.ones``: top-k of equal scores returns the same
index set for every image, so GLCA silently trained on a fixed corner of the grid (SEED_FINDINGS.md,
fix 5). `selection_stats` measures that directly: the part hit-rate against its chance level (the
definitions are `dcal.metrics`'s, reused here) and how similar the selected sets are across images.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dcal.metrics import chance_hit_rate, hits

__all__ = ["selection_stats", "selection_jaccard", "selection_onehot", "random_selection"]

STATIC_JACCARD = 0.9  # mean pairwise Jaccard at or above this: (almost) the same set for every image


def _check_index(local_index: Tensor, num_patches: int) -> Tensor:
    if not isinstance(local_index, Tensor):
        local_index = torch.as_tensor(local_index)
    if local_index.dim() != 2 or local_index.shape[1] < 1:
        raise ValueError(f"local_index must be (B, k) with k >= 1, got shape {tuple(local_index.shape)}")
    if local_index.dtype.is_floating_point or local_index.dtype == torch.bool:
        raise ValueError(f"local_index must hold integer patch indices, got dtype {local_index.dtype}")
    if not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
    if local_index.numel() and (int(local_index.min()) < 0 or int(local_index.max()) >= num_patches):
        raise ValueError(f"local_index values must lie in 0..{num_patches - 1} (num_patches={num_patches}), "
                         f"got range {int(local_index.min())}..{int(local_index.max())}")
    return local_index.long()


def _check_mask(mask: Tensor, name: str, B: int, P: int) -> Tensor:
    mask = torch.as_tensor(mask)
    if mask.shape != (B, P):
        raise ValueError(f"{name} must be (B, P) = ({B}, {P}) to match local_index and num_patches, "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool mask (from dcal.metrics.patches_in_boxes), got {mask.dtype}")
    return mask


def selection_onehot(local_index: Tensor, num_patches: int) -> Tensor:
    """(B, P) float 0/1 matrix: row b marks the patches selected for image b (duplicates count once)."""
    idx = _check_index(local_index, num_patches)
    m = torch.zeros(idx.shape[0], num_patches, dtype=torch.float32, device=idx.device)
    return m.scatter_(1, idx, 1.0)  # (B, P)


def selection_jaccard(local_index: Tensor, num_patches: int) -> float | None:
    """Mean pairwise Jaccard index |S_i ∩ S_j| / |S_i ∪ S_j| over all image pairs i < j (None if B < 2)."""
    m = selection_onehot(local_index, num_patches)  # (B, P)
    B = m.shape[0]
    if B < 2:
        return None
    inter = m @ m.T  # (B, B) |S_i ∩ S_j|
    size = m.sum(dim=1)  # (B,)
    union = size[:, None] + size[None, :] - inter  # (B, B)
    iu = torch.triu_indices(B, B, offset=1, device=m.device)
    return float((inter[iu[0], iu[1]] / union[iu[0], iu[1]]).mean())


def selection_stats(
    local_index: Tensor,
    num_patches: int,
    part_mask: Tensor | None = None,
    distractor_mask: Tensor | None = None,
    *,
    static_threshold: float = STATIC_JACCARD,
) -> dict:
    """Statistics of the GLCA selection over a batch of images.

    Args:
        local_index: (B, k) the selected patch indices (0..P−1), e.g. `DCALOutput.local_index`.
        num_patches: P, the number of patch tokens.
        part_mask: (B, P) bool, the patches of each image's part box (`dcal.metrics.patches_in_boxes`).
        distractor_mask: (B, P) bool, the patches of the distractor marks.
        static_threshold: mean pairwise Jaccard at or above which the selection is flagged static.

    Returns:
        dict with ``num_images``, ``k``, ``part_hit``, ``part_hit_chance``, ``distractor_hit``,
        ``distractor_hit_chance`` (floats, None without the mask), ``selection_jaccard`` (mean pairwise
        Jaccard of the selected sets; None for one image), ``selection_static`` (bool: every image gets
        (almost) the same set, the signature of a uniform fallback) and ``token_frequency`` (P,) float:
        the fraction of images that select each patch.
    """
    idx = _check_index(local_index, num_patches)
    B, k = idx.shape
    if B == 0:
        raise ValueError("local_index holds no images (B = 0)")
    onehot = selection_onehot(idx, num_patches)  # (B, P)
    jac = selection_jaccard(idx, num_patches)
    out = {
        "num_images": B,
        "k": k,
        "part_hit": None,
        "part_hit_chance": None,
        "distractor_hit": None,
        "distractor_hit_chance": None,
        "selection_jaccard": jac,
        "selection_static": bool(jac is not None and jac >= static_threshold),
        "token_frequency": onehot.mean(dim=0).cpu(),  # (P,)
    }
    for name, mask in (("part", part_mask), ("distractor", distractor_mask)):
        if mask is None:
            continue
        mask = _check_mask(mask, f"{name}_mask", B, num_patches).to(idx.device)
        out[f"{name}_hit"] = float(hits(idx, mask).float().mean())
        out[f"{name}_hit_chance"] = chance_hit_rate(mask.cpu(), k)
    return out


def check_bpk(B: int, P: int, k: int) -> None:
    for name, v in (("B", B), ("P", P), ("k", k)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if k > P:
        raise ValueError(f"k={k} exceeds the number of patches P={P}")



def random_selection(B: int, P: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k distinct patches per image drawn uniformly at random (the paper's "random local queries"): (B, k)."""
    check_bpk(B, P, k)
    return torch.rand(B, P, generator=generator).topk(k, dim=1).indices
