"""The attention pieces DCAL needs, written against timm's `Block`/`Attention` so that timm weights run unchanged.

Each function takes a timm block (or its attention) and runs one stage of it. Nothing here owns parameters:
SA, GLCA and PWCA differ only in which queries meet which keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, RolloutError

__all__ = [
    "check_block",
    "embed_tokens",
    "qkv",
    "attention_output",
    "head_mean_attention",
    "sa_block",
    "pwca_block",
    "glca_block",
    "attention_rollout",
]


def check_block(block: nn.Module, name: str) -> None:
    """Raise a ConfigError naming `name` unless `block` is a pre-norm timm block we know how to run."""
    attn = getattr(block, "attn", None)
    needed = ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    if attn is None or any(not hasattr(block, a) for a in needed):
        raise ConfigError(f"{name}: {type(block).__name__} is not a pre-norm timm Block (needs attn, norm1, mlp, ...)")
    if not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "scale")):
        raise ConfigError(f"{name}.attn: {type(attn).__name__} is not a timm Attention with a fused qkv projection")


def embed_tokens(vit: nn.Module, x: Tensor) -> Tensor:
    """The tokens that enter a timm ViT's first block: patch embedding, position embedding (and the prefix
    tokens), patch dropout and the pre-norm, exactly the start of timm's `forward_features`.

    The one place that calls timm's private `_pos_embed`: (B, 3, H, W) images → (B, N, C) tokens.
    """
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, N, C)


def qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of timm's `Attention` for the normalised tokens x (B, N, C); each (B, H, N, hd)."""
    B, N, _ = x.shape
    H = attn.num_heads
    t = attn.qkv(x).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
    q, k, v = t.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_output(attn: nn.Module, o: Tensor, x: Tensor) -> Tensor:
    """timm's post-attention stage: heads merged, (optional) norm and gate, projection, dropout.

    Args:
        o: (B, H, Nq, hd) attention output.
        x: (B, Nq, C) the normalised query tokens (timm's gate reads them).
    """
    B, H, Nq, hd = o.shape
    o = o.transpose(1, 2).reshape(B, Nq, H * hd)  # (B, Nq, H*hd)
    o = getattr(attn, "norm", nn.Identity())(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(o))


def _sdpa(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    p = attn.attn_drop.p if attn.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p)


# On CPU (`tiling`, the model's `DCAL.attention_tiling`) the explicit attention runs one head at a time: a
# head's (B, Nq, Nk) fp32 scores are a third (deit-tiny) to a twelfth (ViT-B) of all heads', so q·kᵀ, the
# softmax, ·v and the running head sum reuse them from cache, and q, k, v are read as the strided views of
# the fused qkv output (no copies). The first head's softmax is written straight into the head-mean map.
# Above `_UNTILED_MAX_BYTES` of scores per head, query rows run in tiles of at most that size.
# Measured (one thread, Intel Xeon, `benchmarks/`): one block's attention output + head-mean weights at
# deit-tiny 224 px b8 2.9-3.0 ms against 3.2-3.5 ms for all heads in one pass (fused SDPA: 2.3 ms), at
# 448 px b2 9.3-9.5 ms against 10.4-11.3 ms (tiles of all heads); row tiles of a head were slower until the
# scores reach ~20 MB per head, where they tie. Numbers equal the one pass's. GPUs: one batched pass
# (`tiling=False`, also what `diagnostics.predict_step_memory` counts).
_UNTILED_MAX_BYTES = 8 << 20


def _tile_rows(B: int, Nq: int, Nk: int) -> int:
    """Query rows per tile of one head's fp32 scores (B, rows, Nk): all `Nq` up to `_UNTILED_MAX_BYTES`."""
    if 4 * B * Nq * Nk <= _UNTILED_MAX_BYTES:
        return Nq
    return max(1, min(Nq, _UNTILED_MAX_BYTES // (4 * B * Nk)))


def _per_head(tiling: bool, q: Tensor) -> bool:
    return tiling and q.device.type == "cpu"


def _softmax_(scores: Tensor) -> Tensor:
    """Softmax over the last dim, in place: the scores' buffer becomes the weights (no second buffer to
    allocate and fault in; bit-equal to `.softmax(-1)`). Only for scores no one else holds and autograd does
    not track."""
    return torch.softmax(scores, -1, out=scores)


def _attention_per_head(q: Tensor, k: Tensor, scale: float, v: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """One head at a time (CPU): head-mean softmax(q·kᵀ·scale) (B, Nq, Nk), and with `v` the output
    (B, H, Nq, hd) as a view of a (B, Nq, H, hd) buffer, the layout `attention_output` merges without a copy.
    q, k, v fp32 (B, H, N·, hd), any strides. No autograd."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    rows = _tile_rows(B, Nq, Nk)
    w = q.new_empty(B, Nq, Nk)
    o = None if v is None else q.new_empty(B, Nq, H, v.shape[-1])
    a = q.new_empty(B, rows, Nk) if H > 1 else None  # the other heads' scores, reused
    for i in range(0, Nq, rows):
        j = min(Nq, i + rows)
        wi = w[:, i:j]  # (B, t, Nk)
        for h in range(H):
            s = wi if h == 0 else a[:, :j - i]
            s.baddbmm_(q[:, h, i:j], k[:, h].transpose(1, 2), beta=0, alpha=scale)  # scores, scale folded in
            _softmax_(s)
            if o is not None:
                torch.bmm(s, v[:, h], out=o[:, i:j, h])  # (B, t, hd)
            if h:
                wi.add_(s)
    if H > 1:
        w.div_(H)
    return (None if o is None else o.transpose(1, 2)), w


@torch.no_grad()
def head_mean_attention(q: Tensor, k: Tensor, scale: float, tiling: bool = True) -> Tensor:
    """Softmax attention weights averaged over heads, fp32, outside autocast: (B, Nq, Nk).

    Recomputes q·kᵀ without gradient so that the differentiable path can keep the fused SDPA kernel.
    `tiling`: on CPU, one head at a time (same numbers; off: all heads in one pass, as on a GPU).
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        if _per_head(tiling, q):
            return _attention_per_head(q, k, scale)[1]
        return _softmax_((q * scale) @ k.transpose(-2, -1)).mean(dim=1)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, tiling: bool) -> tuple[Tensor, Tensor]:
    """softmax(q·kᵀ·scale)·v (B, H, N, hd) and its head mean (B, N, N): one softmax serves both."""
    if _per_head(tiling, q):
        return _attention_per_head(q, k, scale, v)
    a = _softmax_((q * scale) @ k.transpose(-2, -1))  # (B, H, N, N)
    return a @ v, a.mean(dim=1)


def _attend_with_weights(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, tiling: bool) -> tuple[Tensor, Tensor]:
    """Attention output and head-mean weights, computing the softmax once when that is exact and cheap."""
    no_dropout = not (attn.training and attn.attn_drop.p > 0)
    if not torch.is_grad_enabled() and q.dtype == torch.float32 and no_dropout:
        # Inference: one explicit softmax serves both the output and the rollout (no second q·kᵀ). On CPU,
        # per head, this is faster than SDPA plus a recomputed softmax for the weights (benchmarks/).
        return _explicit_attention(q, k, v, attn.scale, tiling)
    return _sdpa(attn, q, k, v), head_mean_attention(q, k, attn.scale, tiling)


def _mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def sa_block(block: nn.Module, x: Tensor, need_weights: bool = True, tiling: bool = True,
             cls_row: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One SA block, exactly timm's `Block.forward`, also returning its k, v and head-mean weights.

    Args:
        need_weights: also return the head-mean attention weights.
        tiling: on CPU the weights are computed one head at a time (`DCAL.attention_tiling`).
        cls_row: return only the CLS query's row of the weights, (B, 1, N): all that `attention_rollout`
            reads from the last map. The output then comes from the fused kernel.

    Returns:
        x (B, N, C), k and v (B, H, N, hd), weights (B, N, N) (or (B, 1, N) with `cls_row`) fp32, or None.
    """
    attn = block.attn
    y = block.norm1(x)
    q, k, v = qkv(attn, y)
    if need_weights and cls_row:
        o, w = _sdpa(attn, q, k, v), head_mean_attention(q[:, :, :1], k, attn.scale, tiling)  # w (B, 1, N)
    elif need_weights:
        o, w = _attend_with_weights(attn, q, k, v, tiling)
    else:
        o, w = _sdpa(attn, q, k, v), None
    x = x + block.drop_path1(block.ls1(attention_output(attn, o, y)))
    return _mlp_residual(block, x), k, v, w


def pwca_block(block: nn.Module, x: Tensor, k2: Tensor, v2: Tensor,
               need_weights: bool = False, tiling: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """One PWCA block on the shared SA weights: queries of image 1 attend to [K1; K2], [V1; V2].

    Args:
        x: (B, N, C) PWCA hidden stream of image 1.
        k2, v2: (B, H, N, hd) keys/values of each row's paired image, from the SA pass at this block.
        need_weights: also return the head-mean attention weights (B, N, 2N), fp32, no gradient.
        tiling: on CPU those weights are computed one head at a time (`DCAL.attention_tiling`).

    Returns:
        x (B, N, C), or (x, weights) with `need_weights`.
    """
    attn = block.attn
    y = block.norm1(x)
    q, k1, v1 = qkv(attn, y)
    k = torch.cat([k1, k2.to(k1.dtype)], dim=2)  # (B, H, 2N, hd)
    v = torch.cat([v1, v2.to(v1.dtype)], dim=2)  # (B, H, 2N, hd)
    x = x + block.drop_path1(block.ls1(attention_output(attn, _sdpa(attn, q, k, v), y)))
    x = _mlp_residual(block, x)
    return (x, head_mean_attention(q, k, attn.scale, tiling)) if need_weights else x


def glca_block(block: nn.Module, x: Tensor, query_index: Tensor) -> Tensor:
    """One GLCA block: the tokens at `query_index` (CLS + the local ones) attend to all tokens.

    Only the query tokens go through the projection, residual and MLP (DCAL_METHOD.md §3).

    Args:
        x: (B, N, C) input tokens (pre-norm).
        query_index: (B, Nq) token indices of the queries (0 = CLS).

    Returns:
        (B, Nq, C) the query tokens after the block.
    """
    attn = block.attn
    B, N, C = x.shape
    H = attn.num_heads
    y = block.norm1(x)  # (B, N, C)
    gather = query_index[:, :, None].expand(-1, -1, C)  # (B, Nq, C)
    yq = y.gather(1, gather)  # (B, Nq, C)
    w, b = attn.qkv.weight, attn.qkv.bias
    D = w.shape[0] // 3
    q = F.linear(yq, w[:D], None if b is None else b[:D]).reshape(B, -1, H, D // H).transpose(1, 2)  # (B, H, Nq, hd)
    kv = F.linear(y, w[D:], None if b is None else b[D:]).reshape(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)  # (B, H, N, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    xq = x.gather(1, gather)  # (B, Nq, C)
    xq = xq + block.drop_path1(block.ls1(attention_output(attn, _sdpa(attn, q, k, v), yq)))
    return _mlp_residual(block, xq)


@torch.no_grad()
def attention_rollout(weights: list[Tensor], names: list[str] | None = None, residual: float = 0.5,
                      row_sums: list[Tensor] | None = None) -> Tensor:
    """CLS row of the attention rollout Ŝ = S̄_L ⋯ S̄_1, S̄_l = rownorm(0.5·S_l + 0.5·I), in O(L·N²).

    r ← e_0; for l = L … 1: r ← r · S̄_l. With z = rowsum(0.5·S + 0.5·I), r·S̄ = 0.5·(r/z)·S + 0.5·(r/z),
    so neither the identity nor any N×N×N product is ever formed.

    Args:
        weights: per block, in forward order, head-mean attention weights (B, N, N), rows summing to 1. The
            last one may be its CLS row alone, (B, 1, N): the chain starts at e_0 and reads nothing else of it.
        names: the block names used in error messages.
        residual: weight of the identity (0.5 in the paper).
        row_sums: each map's row sums, ``w.float().sum(-1)`` ((B, N), or (B, 1) for a CLS row), when the caller
            has them: `DCAL.forward` takes them right after each block, while its map is still in cache,
            which saves the chain a second pass over every map (at 448 px about half the rollout's time).

    Returns:
        (B, N) fp32: the first row of Ŝ over all tokens (prefix tokens included).

    Raises:
        RolloutError naming the block whose map is missing, mis-shaped or non-finite.
    """
    if not weights:
        raise RolloutError("attention rollout got no attention maps (no SA block recorded its weights)")
    names = names or [f"blocks.{i}" for i in range(len(weights))]
    ref = None
    for i, (name, s) in enumerate(zip(names, weights)):
        if s is None:
            raise RolloutError(f"{name}: no attention map was recorded")
        cls_row = i == len(weights) - 1 and s.dim() == 3 and s.shape[1] == 1 and s.shape[2] > 1
        shape = None if s.dim() != 3 else (s.shape[0], s.shape[2], s.shape[2])  # the map a CLS row belongs to
        if s.dim() != 3 or not (cls_row or s.shape[1] == s.shape[2]) or (ref is not None and shape != ref):
            raise RolloutError(f"{name}: attention map has shape {tuple(s.shape)}, expected (B, N, N) "
                               f"{'' if ref is None else 'as ' + str(tuple(ref))}"
                               f"{' (or its CLS row, (B, 1, N), for the last block)' if i == len(weights) - 1 else ''}")
        ref = shape
    B, N, _ = ref
    with torch.autocast(weights[0].device.type, enabled=False):
        # A NaN or Inf anywhere in a map makes its row sum non-finite, and the chain needs the row sums
        # anyway: checking those (B·N values per map, one sync) replaces a B·N² isfinite pass per map, which
        # cost more than the whole chain.
        if row_sums is None:
            sums = [s.float().sum(dim=-1) for s in weights]  # (B, N) each
        elif len(row_sums) != len(weights) or any(z.shape != s.shape[:2] for z, s in zip(row_sums, weights)):
            raise RolloutError(f"attention rollout got row sums of shapes {[tuple(z.shape) for z in row_sums]} "
                               f"for maps of shapes {[tuple(s.shape) for s in weights]}")
        else:
            sums = [z.float() for z in row_sums]
        finite = torch.stack([z.isfinite().all() for z in sums])  # (L,)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise RolloutError(f"{names[bad]}: attention map holds non-finite values", nonfinite=True)
        r = torch.zeros(B, N, device=weights[0].device, dtype=torch.float32)
        r[:, 0] = 1.0
        for s, rowsum in zip(reversed(weights), reversed(sums)):
            z = (1.0 - residual) * rowsum + residual  # (B, N) row sums of S̄ before normalising ((B, 1): CLS row)
            rz = r / z
            if s.shape[1] == 1:  # the last map's CLS row: r = e_0 here, so r·S reads row 0 alone
                r = (1.0 - residual) * rz[:, :1] * s[:, 0].float() + residual * rz  # (B, N)
            else:
                r = (1.0 - residual) * (rz.unsqueeze(1) @ s.float()).squeeze(1) + residual * rz  # (B, N)
    return r
