"""What attention maps cost: the B·H·Nq·Nk score maps eager attention keeps for backward, by arithmetic."""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from .sources import MB

__all__ = ["attention_memory"]


_DIM_KEYS = ("num_heads", "depth", "patch_size", "num_prefix_tokens")


@functools.lru_cache(maxsize=32)
def _timm_dims(name: str) -> dict:
    """Dims of a timm ViT, read from an instance built on the meta device (no weights allocated)."""
    import timm
    if not timm.is_model(name):
        raise ValueError(f"attention_memory: unknown timm model {name!r}; pass the dims explicitly")
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False)
    blocks = getattr(net, "blocks", None)
    if blocks is None or not hasattr(net, "patch_embed"):
        raise ValueError(f"attention_memory: {name!r} is not a timm VisionTransformer; pass the dims explicitly")
    return {"num_heads": blocks[0].attn.num_heads, "depth": len(blocks),
            "patch_size": tuple(net.patch_embed.patch_size)[0], "num_prefix_tokens": net.num_prefix_tokens,
            "embed_dim": net.embed_dim}


def attention_memory(backbone: str | Mapping[str, int], img_size: int, batch_size: int, *, dtype_bytes: int = 4,
                     glca_ratio: float = 0.1, num_heads: int | None = None, depth: int | None = None,
                     patch_size: int | None = None, num_prefix_tokens: int | None = None):
    """Bytes of the attention maps a DCAL training step keeps, per component, as a pandas DataFrame.

    Counts the B·H·Nq·Nk score maps that *eager* attention (softmax, then ``attn @ v``) keeps for backward,
    N = patches + prefix tokens: SA (L layers, N×N), GLCA (1 layer, (1+k)×N), PWCA (L layers, N×2N), plus
    the fp32 head-mean maps kept until the rollout (L × B·N·N). The predecessor system's design (the "seed" of ../shared/seed/) adds a second SA
    pass for image 2 (L × B·H·N·N) and forms the rollout as full (B, N, N) matrix products (a running
    product and a fused map per layer live at once, L·B·N³ multiply-adds). `dcal.layers` uses fused SDPA
    for the differentiable path, which keeps no score map at all; the table is what eager attention costs.

    Args:
        backbone: a timm model name (dims read from a meta-device instance) or a dict with ``num_heads``,
            ``depth``, ``patch_size`` (and optionally ``num_prefix_tokens``, default 1).
        img_size: square input side in pixels.
        dtype_bytes: bytes per score element (4 fp32, 2 fp16/bf16); the rollout maps are fp32 regardless.
        glca_ratio: R, k = max(1, floor(R·P)) local queries.
        num_heads, depth, patch_size, num_prefix_tokens: override the backbone's.

    Returns:
        DataFrame indexed by component with columns ``layers``, ``map`` (shape), ``mb``, ``dcal`` and
        ``predecessor`` (whether the design has it), then rows ``total_dcal`` and ``total_predecessor``;
        ``df.attrs`` holds the resolved dims (N, P, k, H, L, B).
    """
    import pandas as pd

    dims = dict(_timm_dims(backbone)) if isinstance(backbone, str) else dict(backbone)
    for key, v in (("num_heads", num_heads), ("depth", depth), ("patch_size", patch_size),
                   ("num_prefix_tokens", num_prefix_tokens)):
        if v is not None:
            dims[key] = v
    dims.setdefault("num_prefix_tokens", 1)
    missing = [k for k in _DIM_KEYS if dims.get(k) is None]
    if missing:
        raise ValueError(f"attention_memory: missing dims {missing} for backbone {backbone!r}")
    H, L, p, prefix = int(dims["num_heads"]), int(dims["depth"]), int(dims["patch_size"]), int(dims["num_prefix_tokens"])
    if img_size % p:
        raise ValueError(f"attention_memory: img_size {img_size} is not divisible by patch_size {p}")
    B = int(batch_size)
    P = (img_size // p) ** 2
    N = P + prefix
    k = max(1, math.floor(glca_ratio * P))
    rows = [
        # component, layers, map, elements per layer, bytes per element, dcal, predecessor
        ("sa", L, "B·H·N·N", B * H * N * N, dtype_bytes, True, True),
        ("glca", 1, "B·H·(1+k)·N", B * H * (1 + k) * N, dtype_bytes, True, True),
        ("pwca", L, "B·H·N·2N", B * H * N * 2 * N, dtype_bytes, True, True),
        ("rollout_maps", L, "B·N·N fp32", B * N * N, 4, True, False),
        ("predecessor_sa_image2", L, "B·H·N·N", B * H * N * N, dtype_bytes, False, True),
        ("predecessor_rollout_products", 2, "B·N·N fp32 (L·B·N³ MACs)", B * N * N, 4, False, True),
    ]
    df = pd.DataFrame(
        [{"component": c, "layers": n, "map": m, "mb": n * e * b / MB, "dcal": d, "predecessor": s}
         for c, n, m, e, b, d, s in rows]).set_index("component")
    totals = pd.DataFrame([
        {"component": "total_dcal", "layers": None, "map": "", "mb": df.loc[df.dcal, "mb"].sum(), "dcal": True, "predecessor": False},
        {"component": "total_predecessor", "layers": None, "map": "", "mb": df.loc[df.predecessor, "mb"].sum(),
         "dcal": False, "predecessor": True},
    ]).set_index("component")
    out = pd.concat([df, totals])
    out.attrs.update({"N": N, "P": P, "k": k, "H": H, "L": L, "B": B, "patch_size": p, "dtype_bytes": dtype_bytes})
    return out
