"""The predecessor system's (the "seed" implementation of ../shared/seed/) memory-relevant design, as a model `predict_step_memory` can run, and its OOM case.

`PredecessorDCAL` reproduces what made the seed's step big, not its numbers: (1) eager attention: every score
map is materialised by ``softmax`` (fp32 under CUDA autocast) and kept for backward; (2) in training, image 2
goes through a *second* SA pass to get PWCA's keys/values (ours reuses the first pass's); (3) the rollout is
formed as full (B, N, N) matrix products; (4) the maps of the last evaluation forward stay on the module
(``self.attention_maps``), alive into the next training step (the training forward does not touch them: our
reading of "the model keeps self.attention_maps in eval"). No gradient checkpointing (the seed's PWCA path ran
"Standard forward without checkpointing"). `predecessor_case` predicts it next to our DCAL at the log's setting.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PredecessorDCAL", "predecessor_case", "PREDECESSOR_OOM"]

GiB = 2 ** 30
MiB = 2 ** 20
# The seed's OOM message (../shared/seed/SEED_EVIDENCE.md), in bytes.
PREDECESSOR_OOM = {
    "gpu_total_bytes": int(15.89 * GiB),
    "allocated_bytes": int(14.12 * GiB),           # "14.12 GiB is allocated by PyTorch"
    "reserved_unallocated_bytes": int(1.25 * GiB),  # "1.25 GiB is reserved by PyTorch but unallocated"
    "requested_bytes": 226 * MiB,                   # "Tried to allocate 226.00 MiB"
    "free_bytes": int(225.12 * MiB),
}


def _eager_attention(attn: nn.Module, xq: Tensor, xkv: Tensor | None = None,
                     kv_extra: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """softmax(q·kᵀ·scale)·v with the map materialised: (output (B, Nq, C), map (B, H, Nq, Nk), k, v)."""
    B, Nq, C = xq.shape
    H = attn.num_heads
    xkv = xq if xkv is None else xkv
    qkv_q = attn.qkv(xq).reshape(B, Nq, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (3, B, H, Nq, hd)
    q = qkv_q[0]
    if xkv is xq:
        k, v = qkv_q[1], qkv_q[2]
    else:
        kv = attn.qkv(xkv).reshape(B, xkv.shape[1], 3, H, C // H).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        k, v = kv[1], kv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if kv_extra is not None:
        k = torch.cat([k, kv_extra[0]], dim=2)  # (B, H, 2N, hd)
        v = torch.cat([v, kv_extra[1]], dim=2)
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, Nq, Nk)
    o = (attn.attn_drop(a) @ v).transpose(1, 2).reshape(B, Nq, C)  # (B, Nq, C)
    return attn.proj_drop(attn.proj(o)), a, k[:, :, : xkv.shape[1]], v[:, :, : xkv.shape[1]]


def _block(blk: nn.Module, x: Tensor, kv_extra=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    o, a, k, v = _eager_attention(blk.attn, blk.norm1(x), kv_extra=kv_extra)
    x = x + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), a, k, v


class PredecessorDCAL(nn.Module):
    """DCAL as the seed system built it, for memory only (see the module docstring).

    Args:
        vit: a timm `VisionTransformer` (SA branch; its last block is copied for GLCA).
        num_classes: classes of the three heads (GLCA gets its own norm and head).
        glca_ratio: R, k = max(1, floor(R·P)) local queries.
    """

    def __init__(self, vit: nn.Module, num_classes: int, glca_ratio: float = 0.1):
        super().__init__()
        self.vit = vit
        self.vit.reset_classifier(num_classes)
        self.glca_block = copy.deepcopy(vit.blocks[-1])
        self.glca_norm = copy.deepcopy(vit.norm)
        self.glca_head = nn.Linear(vit.embed_dim, num_classes)
        self.prefix = vit.num_prefix_tokens
        self.num_local = max(1, int(glca_ratio * vit.patch_embed.num_patches))
        self.attention_maps: list[Tensor] = []

    def _embed(self, x: Tensor) -> Tensor:
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))  # (B, N, C)

    def _sa(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[tuple[Tensor, Tensor]], Tensor]:
        h = self._embed(x)
        maps, kvs, glca_in = [], [], h
        for blk in self.vit.blocks:
            glca_in = h
            h, a, k, v = _block(blk, h)
            maps.append(a)
            kvs.append((k, v))
        return h, maps, kvs, glca_in

    @torch.no_grad()
    def _rollout(self, maps: list[Tensor]) -> Tensor:
        """Full products: R ← Ā_l·R with Ā_l = rownorm(½·mean_h A_l + ½·I), (B, N, N) fp32 each."""
        B, _, N, _ = maps[0].shape
        eye = torch.eye(N, device=maps[0].device)
        r = eye.expand(B, N, N)
        for a in maps:
            m = 0.5 * a.float().mean(dim=1) + 0.5 * eye  # (B, N, N)
            r = (m / m.sum(dim=-1, keepdim=True)) @ r
        return r[:, 0, self.prefix:]  # (B, P)

    def _glca(self, h: Tensor, rollout: Tensor) -> Tensor:
        idx = rollout.topk(self.num_local, dim=1).indices + self.prefix  # (B, k)
        q_idx = torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1)  # (B, 1+k)
        blk = self.glca_block
        y = blk.norm1(h)
        yq = y.gather(1, q_idx[:, :, None].expand(-1, -1, y.shape[-1]))  # (B, 1+k, C)
        o, _, _, _ = _eager_attention(blk.attn, yq, y)
        xq = h.gather(1, q_idx[:, :, None].expand(-1, -1, h.shape[-1])) + blk.drop_path1(blk.ls1(o))
        xq = xq + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(xq))))
        return self.glca_head(self.glca_norm(xq)[:, 0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(SA logits, GLCA logits, PWCA logits or None in eval), each (B, C)."""
        h, maps, _, glca_in = self._sa(x)
        if not self.training:
            self.attention_maps = [a.detach() for a in maps]  # kept on the module (the seed's design)
        sa = self.vit.forward_head(self.vit.norm(h))
        glca = self._glca(glca_in, self._rollout(maps))
        if not self.training:
            return sa, glca, None
        pair = torch.roll(torch.arange(x.shape[0], device=x.device), 1)  # a derangement, no data read
        _, _, kvs2, _ = self._sa(x[pair])  # the second SA pass, for image 2's keys/values
        h_pw = self._embed(x)
        for blk, kv2 in zip(self.vit.blocks, kvs2):
            h_pw, _, _, _ = _block(blk, h_pw, kv_extra=kv2)
        return sa, glca, self.vit.forward_head(self.vit.norm(h_pw))


def _predecessor_loss(out) -> Tensor:
    present = [z for z in out if z is not None]
    y = torch.randint(0, present[0].shape[1], (present[0].shape[0],), device=present[0].device)
    return sum(F.cross_entropy(z.float(), y) for z in present)


def predecessor_case(batch_size: int = 4, img_size: int = 448, amp_dtype: torch.dtype | None = torch.float16,
              backbone: str = "vit_base_patch16_224", num_classes: int = 200, grad_checkpointing: bool = False,
              target: str = "cuda") -> dict:
    """Predicted peaks of our DCAL and of the seed's design at the seed's setting, next to the log's numbers.

    Both models are built on meta (no weights). Optimiser: Adam for the seed (its `torch.optim.Adam`), AdamW
    for ours (same state size). Evaluation: one batch of `batch_size` images, then the first training step.

    Args:
        batch_size, img_size, amp_dtype, backbone, num_classes: the setting (default: the seed's run).
        grad_checkpointing: for our DCAL (the seed's PWCA path never checkpointed).
        target: ``"cuda"`` (the log's GPU) or ``"cpu"``.

    Returns:
        ``{"ours": MemoryPrediction, "seed": MemoryPrediction, "log": PREDECESSOR_OOM}``.
    """
    import timm

    import dcal
    from diagnostics.memory import predict_step_memory

    shape = (batch_size, 3, img_size, img_size)
    with torch.device("meta"):
        ours = dcal.build_model(backbone, num_classes=num_classes, img_size=img_size, pretrained=False,
                                grad_checkpointing=grad_checkpointing)
        seed = PredecessorDCAL(timm.create_model(backbone, pretrained=False, img_size=img_size), num_classes)
    kw = dict(amp_dtype=amp_dtype, target=target, eval_inputs=shape)
    return {
        "ours": predict_step_memory(ours, shape, **kw),
        "seed": predict_step_memory(seed, shape, loss_fn=_predecessor_loss,
                                    optimizer=lambda m, _: torch.optim.Adam(m.parameters(), lr=1e-5, weight_decay=0.05),
                                    **kw),
        "log": dict(PREDECESSOR_OOM),
    }
