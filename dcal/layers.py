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


# On CPU, when the (B, H, N, N) fp32 scores are large, the explicit attention runs in tiles of query rows (all
# heads at once, ~2 MiB of scores each): q·kᵀ, softmax, ·v and the head mean of a tile then stay in L2
# instead of streaming the scores through memory several times. Measured (benchmarks/, deit-tiny, 1 thread):
# at 448 px b2 (15 MB of scores) tiles cut the weights' overhead over SDPA by about half; at 224 px b8
# (3.7 MB) one untiled pass was faster. GPUs: one pass. Whether a model may tile is its own switch,
# `DCAL.attention_tiling`, passed down as `tiling` (off: one pass on CPU too, as a GPU runs it).
_TILE_BYTES = 2 << 20
_UNTILED_MAX_BYTES = 8 << 20


def _tile_rows(q: Tensor, keys: int | None = None, tiling: bool = True) -> int:
    """Query rows per tile: N (one pass) unless `tiling` is on, q is on CPU and the fp32 scores (N × `keys`,
    default N) exceed `_UNTILED_MAX_BYTES`."""
    B, H, N, _ = q.shape
    keys = N if keys is None else keys
    if not tiling or q.device.type != "cpu" or 4 * B * H * N * keys <= _UNTILED_MAX_BYTES:
        return N
    return max(1, min(N, _TILE_BYTES // (4 * B * H * keys)))


def _add_head_mean(a: Tensor, out: Tensor) -> None:
    """out ← mean of `a` (B, H, t, N) over heads, written in place into `out` (B, t, N), a slice of the map."""
    H = a.shape[1]
    if H == 1:
        out.copy_(a[:, 0])
        return
    torch.add(a[:, 0], a[:, 1], out=out)
    for h in range(2, H):
        out.add_(a[:, h])
    out.div_(H)


def _softmax_(scores: Tensor) -> Tensor:
    """Softmax over the last dim, in place: the scores' buffer becomes the weights (no second (B, H, N, N)
    buffer to allocate and fault in; bit-equal to `.softmax(-1)`). Measured: about a tenth off the explicit
    attention at 224 px b8 (one thread). Only for scores no one else holds and autograd does not track."""
    return torch.softmax(scores, -1, out=scores)


@torch.no_grad()
def head_mean_attention(q: Tensor, k: Tensor, scale: float, tiling: bool = True) -> Tensor:
    """Softmax attention weights averaged over heads, fp32, outside autocast: (B, Nq, Nk).

    Recomputes q·kᵀ without gradient so that the differentiable path can keep the fused SDPA kernel.
    `tiling`: on CPU, large scores may be computed in tiles of query rows (same numbers; off: one pass).
    """
    with torch.autocast(q.device.type, enabled=False):
        B, H, N, _ = q.shape
        Nk = k.shape[2]
        qs, kt = q.float() * scale, k.float().transpose(-2, -1)  # (B, H, N, hd), (B, H, hd, Nk)
        rows = _tile_rows(q, Nk, tiling)
        if rows >= N:
            return _softmax_(qs @ kt).mean(dim=1)
        kt = kt.contiguous()  # once, not once per tile
        w = q.new_empty(B, N, Nk, dtype=torch.float32)
        for i in range(0, N, rows):
            _add_head_mean(_softmax_(qs[:, :, i:i + rows] @ kt), w[:, i:i + rows])  # tile (B, H, t, N)
        return w


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, tiling: bool) -> tuple[Tensor, Tensor]:
    """softmax(q·kᵀ·scale)·v (B, H, N, hd) and its head mean (B, N, N): one softmax serves both."""
    B, H, N, hd = q.shape
    rows = _tile_rows(q, tiling=tiling)
    if rows >= N:
        a = _softmax_((q * scale) @ k.transpose(-2, -1))  # (B, H, N, N)
        return a @ v, a.mean(dim=1)
    # k and v come as strided views of the fused qkv output: made contiguous once, not once per tile.
    qs, kt, v = q * scale, k.transpose(-2, -1).contiguous(), v.contiguous()  # (B, H, N, hd), (B, H, hd, N)
    o = q.new_empty(B, N, H, hd)  # the layout `attention_output` merges heads in without a copy
    w = q.new_empty(B, N, N)
    for i in range(0, N, rows):
        a = _softmax_(qs[:, :, i:i + rows] @ kt)  # (B, H, t, N)
        o[:, i:i + rows] = (a @ v).transpose(1, 2)  # (B, t, H, hd)
        _add_head_mean(a, w[:, i:i + rows])
    return o.transpose(1, 2), w


def _attend_with_weights(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, tiling: bool) -> tuple[Tensor, Tensor]:
    """Attention output and head-mean weights, computing the softmax once when that is exact and cheap."""
    no_dropout = not (attn.training and attn.attn_drop.p > 0)
    if not torch.is_grad_enabled() and q.dtype == torch.float32 and no_dropout:
        # Inference: one explicit softmax serves both the output and the rollout (no second q·kᵀ). On CPU,
        # tiled, this is faster than SDPA plus a recomputed softmax for the weights (benchmarks/).
        return _explicit_attention(q, k, v, attn.scale, tiling)
    return _sdpa(attn, q, k, v), head_mean_attention(q, k, attn.scale, tiling)


def _mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def sa_block(block: nn.Module, x: Tensor, need_weights: bool = True, tiling: bool = True,
             cls_row: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One SA block, exactly timm's `Block.forward`, also returning its k, v and head-mean weights.

    Args:
        need_weights: also return the head-mean attention weights.
        tiling: on CPU the weights may be computed in tiles of query rows (`DCAL.attention_tiling`).
        cls_row: return only the CLS query's row of the weights, (B, 1, N): all that `attention_rollout`
            reads from the last map. The output then comes from the fused kernel.

    Returns:
        x (B, N, C), k and v (B, H, N, hd), weights (B, N, N) (or (B, 1, N) with `cls_row`) fp32, or None.
    """
    attn = block.attn
    y = block.norm1(x)
    q, k, v = qkv(attn, y)
    if need_weights and cls_row:
        o, w = _sdpa(attn, q, k, v), head_mean_attention(q[:, :, :1], k, attn.scale)  # w (B, 1, N)
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
        tiling: on CPU those weights may be computed in tiles of query rows (`DCAL.attention_tiling`).

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
def attention_rollout(weights: list[Tensor], names: list[str] | None = None, residual: float = 0.5) -> Tensor:
    """CLS row of the attention rollout Ŝ = S̄_L ⋯ S̄_1, S̄_l = rownorm(0.5·S_l + 0.5·I), in O(L·N²).

    r ← e_0; for l = L … 1: r ← r · S̄_l. With z = rowsum(0.5·S + 0.5·I), r·S̄ = 0.5·(r/z)·S + 0.5·(r/z),
    so neither the identity nor any N×N×N product is ever formed.

    Args:
        weights: per block, in forward order, head-mean attention weights (B, N, N), rows summing to 1. The
            last one may be its CLS row alone, (B, 1, N): the chain starts at e_0 and reads nothing else of it.
        names: the block names used in error messages.
        residual: weight of the identity (0.5 in the paper).

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
        sums = [s.float().sum(dim=-1) for s in weights]  # (B, N) each
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
