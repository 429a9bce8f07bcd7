"""The predecessor system (the "seed" implementation of ../shared/seed/) as its code runs a training step, for
`predict_step_memory`, and the OOM its log ends with.

`PredecessorDCAL` is written from a reading of the predecessor's code (`mossbee/clau_duaL_cross_attention_learning`,
`dual_cross_attention/models/dual_vit.py`, `models/attention_modules.py`, `configs/fgvc_config.py`, `train.py`);
nothing of it is copied. What decides its memory, each read from that code:

- Its own ViT-B (`DualCrossAttentionViT`): 12 blocks whose attention materialises every score map
  (``softmax(q·kᵀ·scale)``, fp32 under CUDA autocast) and applies dropout to it (`SelfAttention.attn_dropout`),
  then to the projection (`proj_dropout`) and twice in the MLP (after GELU and after the second linear);
  ``dropout: 0.1`` (`fgvc_config.py`). On a GPU, ``nn.Dropout`` dispatches to ``native_dropout``, which keeps
  a **bool** mask for backward; this module calls ``torch.native_dropout`` itself so that a meta run (which
  dispatches as on a CPU, where ``nn.Dropout`` keeps a float mask) saves what the GPU saved.
- Training forward, per block (its "standard forward without checkpointing"): SA on image 1 (its map kept in
  the rollout history), SA on image 2 (the paired image evolves through every block for PWCA's keys/values),
  then PWCA: image 1's queries over both images' keys and values, a (B, H, N, 2N) map, the block's MLP after.
- GLCA: one block with its own q/k/v/out projections and MLP, queries = CLS + the top 10 % patches by the
  rollout of the SA maps (full (B, N, N) products under no_grad), keys/values over all N tokens; the block's
  MLP runs on all N tokens (the unselected rows are a zero residual).
- ``self.attention_maps``: set at the end of every forward; in eval it holds the 12 SA maps of that batch, in
  training it is emptied (``{}``). The evaluation's maps therefore stay alive through the next training
  *forward* and are freed at its end, before the backward.
- Parameters: 93,645,715 at ViT-B/16, 448 px, 200 classes: the log's "93.65M parameters" (a check that the
  structure is the one that ran: a GLCA block with an SA branch of its own would give 100.73M).

Not modelled (a few MiB each, named where the notebook compares): the GradScaler's scale and found-inf
tensors, `clip_grad_norm_`'s norms, stochastic depth's per-sample masks (B values per block).
`predecessor_case` predicts the ordinary training step, the evaluation step and the first training step
after an evaluation at the log's setting.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PredecessorDCAL", "KeepsEvalMaps", "PredecessorLoss", "predecessor_case", "predecessor_optimizer", "PREDECESSOR_OOM",
           "VIT_B16"]

GiB = 2 ** 30
MiB = 2 ** 20
# The seed's OOM message (../shared/seed/SEED_EVIDENCE.md), in bytes.
PREDECESSOR_OOM = {
    "gpu_total_bytes": int(15.89 * GiB),
    "allocated_bytes": int(14.12 * GiB),           # "14.12 GiB is allocated by PyTorch"
    "reserved_unallocated_bytes": int(1.25 * GiB),  # "1.25 GiB is reserved by PyTorch but unallocated"
    "requested_bytes": 226 * MiB,                   # "Tried to allocate 226.00 MiB"
    "free_bytes": int(225.12 * MiB),
    "process_in_use_bytes": int(15.67 * GiB),       # "this process has 15.67 GiB memory in use"
}
# The predecessor's FGVC model (fgvc_config.py): ViT-B/16 dimensions, dropout 0.1, R = 10 %.
VIT_B16 = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, dropout=0.1, top_k_ratio=0.1)
# Its optimiser (train.py, fgvc_config.py): Adam over the model's and the loss's parameters, coupled L2 0.05,
# LR 5e-4 × 16 / 512.
ADAM_LR, ADAM_WEIGHT_DECAY = 5e-4 * 16 / 512, 0.05


class _Dropout(nn.Module):
    """Dropout as a GPU runs ``nn.Dropout``: ``native_dropout``, a bool mask kept for backward."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return torch.native_dropout(x, self.p, True)[0] if self.training and self.p > 0 else x


def _mlp(dim: int, hidden: int, p: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), _Dropout(p), nn.Linear(hidden, dim), _Dropout(p))


class _Attention(nn.Module):
    """Eager multi-head attention with a fused qkv projection; returns the output and the clean (pre-dropout)
    softmax map. ``kv_from`` adds a second input's keys/values after the first's (PWCA, computed with the same
    weights)."""

    def __init__(self, dim: int, heads: int, p: float):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = _Dropout(p), _Dropout(p)

    def _qkv(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        return self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)

    def forward(self, x: Tensor, kv_from: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, N, C = x.shape
        q, k, v = self._qkv(x).unbind(0)
        if kv_from is not None:
            _, k2, v2 = self._qkv(kv_from).unbind(0)
            k, v = torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2)  # (B, H, 2N, hd)
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N or 2N)
        o = (self.attn_drop(a) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(o)), a


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, p: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = _Attention(dim, heads, p), _mlp(dim, hidden, p)

    def forward(self, x: Tensor, kv_from: Tensor | None = None) -> tuple[Tensor, Tensor]:
        o, a = self.attn(self.norm1(x), None if kv_from is None else self.norm1(kv_from))
        x = x + o
        return x + self.mlp(self.norm2(x)), a


class _GLCABlock(nn.Module):
    """CLS + the top-R patches by rollout attend to all N tokens; the MLP then runs on all N tokens."""

    def __init__(self, dim: int, heads: int, hidden: int, p: float, top_k_ratio: float):
        super().__init__()
        self.heads, self.scale, self.top_k_ratio = heads, (dim // heads) ** -0.5, top_k_ratio
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.attn_drop, self.proj_drop = _Dropout(p), _Dropout(p)
        self.mlp = _mlp(dim, hidden, p)

    @staticmethod
    @torch.no_grad()
    def rollout(maps: list[Tensor]) -> Tensor:
        """CLS row of Π_l rownorm(½·mean_h A_l + ½·I): full (B, N, N) products; (B, N − 1)."""
        B, N = maps[0].shape[0], maps[0].shape[-1]
        eye = torch.eye(N, device=maps[0].device).unsqueeze(0).expand(B, -1, -1)
        r = eye
        for a in maps:
            m = (a.mean(dim=1) + eye) / 2
            r = (m / (m.sum(dim=-1, keepdim=True) + 1e-8)) @ r
        return r[:, 0, 1:]

    def forward(self, x: Tensor, maps: list[Tensor]) -> Tensor:
        B, N, C = x.shape
        y = self.norm1(x)
        k_sel = max(1, int((N - 1) * self.top_k_ratio))
        idx = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device),
                         self.rollout(maps).topk(k_sel, dim=-1).indices + 1], dim=1)  # (B, 1 + k)
        H, hd = self.heads, C // self.heads
        k = self.k(y).reshape(B, N, H, hd).transpose(1, 2)
        v = self.v(y).reshape(B, N, H, hd).transpose(1, 2)
        yq = y.gather(1, idx[:, :, None].expand(-1, -1, C))
        q = self.q(yq).reshape(B, -1, H, hd).transpose(1, 2)
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, 1 + k, N)
        o = self.proj_drop(self.proj((self.attn_drop(a) @ v).transpose(1, 2).reshape(B, -1, C)))
        delta = torch.zeros_like(x, dtype=o.dtype).scatter(1, idx[:, :, None].expand(-1, -1, C), o)
        x = x + delta
        return x + self.mlp(self.norm2(x))


class PredecessorDCAL(nn.Module):
    """DCAL as the predecessor's code builds and runs it, for memory (module docstring).

    ``forward(x, x_pair=None)`` as its trainer calls it (``model(images, paired_images)`` in training,
    ``model(images)`` in evaluation) returns a dict of logits (``sa_logits``, ``glca_logits``, and
    ``pwca_logits`` when training with a pair).

    Args:
        img_size: square input side.
        num_classes: classes of the SA head (shared by PWCA) and the GLCA head.
        patch_size, embed_dim, depth, num_heads, mlp_dim, dropout, top_k_ratio: the architecture
            (`VIT_B16` is the predecessor's).
    """

    def __init__(self, img_size: int, num_classes: int, *, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_dim: int = 3072, dropout: float = 0.1, top_k_ratio: float = 0.1):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        n = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.pos_drop = _Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_dim, dropout) for _ in range(depth))
        self.glca = _GLCABlock(embed_dim, num_heads, mlp_dim, dropout, top_k_ratio)
        self.norm = nn.LayerNorm(embed_dim)
        self.sa_head, self.glca_head = nn.Linear(embed_dim, num_classes), nn.Linear(embed_dim, num_classes)
        self.log_vars = nn.Parameter(torch.zeros(3))  # the model's own (unused) uncertainty weights: counted
        self.attention_maps: dict[str, list[Tensor]] = {}

    def _embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward(self, x: Tensor, x_pair: Tensor | None = None) -> dict[str, Tensor]:
        pairing = x_pair is not None and self.training
        h = self._embed(x)
        h2 = self._embed(x_pair) if pairing else None
        hp = h.clone() if pairing else None
        maps = []
        for blk in self.blocks:
            h, a = blk(h)
            maps.append(a)
            if pairing:
                h2, _ = blk(h2)  # image 2 through SA: PWCA's keys/values at the next block
                hp, _ = blk(hp, kv_from=h2)
        out = {"sa_logits": self.sa_head(self.norm(h)[:, 0])}
        if pairing:
            out["pwca_logits"] = self.sa_head(self.norm(hp)[:, 0])
        out["glca_logits"] = self.glca_head(self.norm(self.glca(h.clone(), maps))[:, 0])
        # Set at the end of every forward: the SA maps in eval, emptied in training.
        self.attention_maps = {} if self.training else {"sa_attention": maps}
        return out


class KeepsEvalMaps(PredecessorDCAL):
    """The control for the earlier (wrong) reading of the predecessor: the evaluation's maps stay on the module
    through the next training step (its code empties them at the end of every training forward)."""

    def forward(self, x, x_pair=None):
        kept = self.attention_maps if self.training else None
        out = super().forward(x, x_pair)
        if self.training:
            self.attention_maps = kept
        return out


class PredecessorLoss(nn.Module):
    """½·Σ_i (e^(−w_i)·CE_i + w_i) over the branches present, against labels made from the batch's shape
    (memory does not depend on their values)."""

    def __init__(self):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(3))

    def forward(self, out: dict[str, Tensor]) -> Tensor:
        logits = [out[k] for k in ("sa_logits", "glca_logits", "pwca_logits") if k in out]
        y = torch.arange(logits[0].shape[0], device=logits[0].device) % logits[0].shape[1]
        return 0.5 * sum(torch.exp(-w) * F.cross_entropy(z.float(), y) + w for z, w in zip(logits, self.log_vars))


def predecessor_optimizer(model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
    """The predecessor's optimiser: ``torch.optim.Adam`` over the model's and the loss's parameters."""
    params = [*model.parameters(), *(loss_fn.parameters() if isinstance(loss_fn, nn.Module) else [])]
    return torch.optim.Adam(params, lr=ADAM_LR, weight_decay=ADAM_WEIGHT_DECAY)


def predecessor_case(batch_size: int = 4, img_size: int = 448, amp_dtype: torch.dtype | None = torch.float16,
                     num_classes: int = 200, eval_batch_size: int = 2, grad_accum_steps: int = 1,
                     target: str = "cuda", arch: dict | None = None) -> dict:
    """The predecessor's step at the log's setting, predicted with `predict_step_memory`, next to the log.

    The model is built on meta (no weights). The prediction holds the ordinary training step (two optimiser
    steps), an evaluation batch and the first training step after it. The default evaluation batch is the
    *last* one of the predecessor's evaluation (5,794 test images in batches of 4 leave 2: the log's
    "1449/1449"), whose maps are the ones left on the module when training resumes.

    Args:
        batch_size, img_size, amp_dtype, num_classes: the training setting (default: the log's run).
        eval_batch_size: the evaluation batch before the first training step after evaluation.
        grad_accum_steps: micro-batches per optimiser step (the predecessor's fix ran 2 × 8).
        target: ``"cuda"`` (the log's GPU) or ``"cpu"``.
        arch: `PredecessorDCAL` keywords (default `VIT_B16`).

    Returns:
        ``{"predecessor": MemoryPrediction, "parameters": int, "log": PREDECESSOR_OOM}``.
    """
    from diagnostics.memory import predict_step_memory

    arch = dict(VIT_B16 if arch is None else arch)
    with torch.device("meta"):
        model = PredecessorDCAL(img_size, num_classes, **arch)
    x = (batch_size, 3, img_size, img_size)
    pred = predict_step_memory(model, (x, x), loss_fn=PredecessorLoss(), optimizer=predecessor_optimizer,
                               amp_dtype=amp_dtype, grad_accum_steps=grad_accum_steps, target=target,
                               eval_inputs=((eval_batch_size, 3, img_size, img_size),))
    return {"predecessor": pred, "parameters": sum(p.numel() for p in model.parameters()), "log": dict(PREDECESSOR_OOM)}
