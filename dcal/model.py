"""DCAL: a timm ViT/DeiT (the SA branch) plus global-local (GLCA) and pair-wise (PWCA) cross-attention.

See DCAL_METHOD.md. The SA branch *is* the timm model (`model.backbone`, same parameters, timm's state-dict
keys); GLCA adds one block with its own weights, final norm and head (`model.glca`); PWCA adds no
parameters: it re-runs the backbone blocks on a second hidden stream whose keys/values are extended with
the paired image's keys/values from the SA pass.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .layers import attention_rollout, check_block, embed_tokens, glca_block, pwca_block, sa_block
from .pretrained import load_pretrained

__all__ = ["DCAL", "DCALOutput", "GLCA", "build_model", "derangement", "eval_mode", "fused_probs", "select_local",
           "GLCA_SELECTIONS"]

GLCA_PLACEMENTS = ("stacked", "parallel")
GLCA_INITS = ("copy", "random")
GLCA_POOLS = ("cls", "mean", "local")
# How GLCA's local queries are chosen. "rollout" is the method; the other two exist to measure what the
# rollout buys: "uniform" is the seed system's fallback (top-k of torch.ones: the same patches for every
# image), "random" is the paper's "random local queries" ablation (k distinct patches drawn per image).
GLCA_SELECTIONS = ("rollout", "uniform", "random")
_VIT_FAMILIES = ("vision_transformer", "deit", "vision_transformer_hybrid")


@dataclass
class DCALOutput:
    """What one forward pass returns.

    sa_logits (B, C); glca_logits (B, C) or None (GLCA off); pwca_logits (B, C) or None (eval or PWCA
    off); rollout (B, P): CLS row of the accumulated rollout over the P patch tokens (prefix columns
    dropped, not renormalised); local_index (B, k): the GLCA-selected patches (0..P−1), best first;
    pwca_attention: only with ``forward(..., pwca_attention=True)``, per backbone block the PWCA attention
    weights averaged over heads, (B, N, 2N) fp32 without gradient, keys ordered [image 1; image 2].
    """

    sa_logits: Tensor
    glca_logits: Tensor | None
    pwca_logits: Tensor | None
    rollout: Tensor
    local_index: Tensor
    pwca_attention: list[Tensor] | None = None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore its previous mode after (exceptions included)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def fused_probs(sa_logits: Tensor, glca_logits: Tensor | None) -> Tensor:
    """DCAL's FGVC prediction (DCAL_METHOD.md §8): softmax(SA) + softmax(GLCA), in fp32; SA alone without GLCA.

    The one place the fused prediction is written: `DCAL.predict`, the trainer's evaluation and the
    diagnostics all call it.
    """
    p = sa_logits.float().softmax(-1)
    return p if glca_logits is None else p + glca_logits.float().softmax(-1)


def select_local(scores: Tensor, k: int, mode: str = "rollout") -> Tensor:
    """The k local query patches per image, best first: (B, P) patch scores → (B, k) indices in 0..P−1.

    ``mode`` is one of `GLCA_SELECTIONS`: ``"rollout"`` (top-k of the scores), ``"uniform"`` (the seed's
    ``torch.ones(B, P).topk(k)``: whatever the kernel's tie-breaking yields, the same set for every image),
    ``"random"`` (top-k of uniform noise from the global RNG: k distinct patches per image).
    """
    if mode == "rollout":
        return scores.topk(k, dim=1, sorted=True).indices
    if mode == "uniform":
        return torch.ones_like(scores).topk(k, dim=1).indices
    if mode == "random":
        return torch.rand_like(scores).topk(k, dim=1).indices
    raise ConfigError(f"glca_selection must be one of {GLCA_SELECTIONS}, got {mode!r}")


def derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of 0..n−1 with no fixed point (rejection sampling; ~e tries)."""
    if n < 2:
        raise ConfigError(f"a derangement needs n >= 2 (got n={n}): PWCA cannot pair a micro-batch of {n}")
    ar = torch.arange(n)
    while True:
        p = torch.randperm(n, generator=generator)
        if not bool((p == ar).any()):
            return p


class GLCA(nn.Module):
    """Everything GLCA adds: one pre-norm block with its own weights, its own final norm and head.

    Args:
        pool: what the head reads (DCAL_METHOD.md §3: it must depend on the selected local queries).
            ``"mean"`` (default): the mean of the 1+k query outputs, CLS and the k local tokens.
            ``"local"``: the mean of the k local query outputs only (CLS still queries; the head does not
            read it). ``"cls"``: GLCA's CLS output alone, kept for comparison: with one GLCA block the CLS
            output depends only on the CLS query (which attends to every token), so the selection never
            reaches the logits. The default was chosen by measurement (README, "Ablation").
    """

    def __init__(self, block: nn.Module, norm: nn.Module, head: nn.Module, pool: str = "mean"):
        super().__init__()
        if pool not in GLCA_POOLS:
            raise ConfigError(f"glca_pool must be one of {GLCA_POOLS}, got {pool!r}")
        self.block = block
        self.norm = norm
        self.head = head
        self.pool = pool

    def forward(self, x: Tensor, query_index: Tensor) -> Tensor:
        """x (B, N, C) tokens, query_index (B, 1+k) with CLS first → logits (B, num_classes)."""
        xq = self.norm(glca_block(self.block, x, query_index))  # (B, 1+k, C)
        if self.pool == "cls":
            return self.head(xq[:, 0])
        return self.head(xq.mean(dim=1) if self.pool == "mean" else xq[:, 1:].mean(dim=1))

    def extra_repr(self) -> str:
        return f"pool={self.pool}"


def _init_like_timm(module: nn.Module) -> None:
    """timm's default ViT init (trunc-normal 0.02 linears, zero bias, unit norms)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DCAL(nn.Module):
    """Dual Cross-Attention Learning on a timm VisionTransformer.

    Args:
        backbone: a timm `VisionTransformer` with a class token (the SA branch; its weights are SA's).
        glca: build the GLCA branch.
        pwca: run the PWCA branch in training.
        glca_ratio: R, the fraction of patch tokens GLCA selects (k = max(1, floor(R·P))).
        glca_placement: ``"stacked"`` (GLCA reads the last block's output, rollout over L blocks) or
            ``"parallel"`` (GLCA reads block L's input, rollout over L−1 blocks).
        glca_init: ``"copy"`` (GLCA starts from the last SA block, final norm and head) or ``"random"``.
        glca_pool: ``"mean"`` (mean of the 1+k query outputs, the default), ``"local"`` (mean of the k
            local outputs) or ``"cls"`` (GLCA's CLS output, which ignores the selection); see `GLCA`.
        glca_selection: how the local queries are chosen, one of `GLCA_SELECTIONS` (``"rollout"``, the
            method; ``"uniform"`` and ``"random"`` only to measure what the rollout buys).
        pwca_detach_kv: stop gradients through image 2's keys/values in PWCA (the paper is silent; off).
        grad_checkpointing: recompute SA and PWCA blocks in backward (`torch.utils.checkpoint`).

    Attributes:
        attention_tiling: on CPU, the explicit attention weights the rollout needs are computed one head at a
            time, in tiles of query rows when a head's scores are large (True, the default: same numbers,
            faster); False runs all heads in one pass, as on a GPU (`diagnostics.predict_step_memory` sets it
            to count a GPU step's tensors).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        glca: bool = True,
        pwca: bool = True,
        glca_ratio: float = 0.1,
        glca_placement: str = "stacked",
        glca_init: str = "random",
        glca_pool: str = "mean",
        glca_selection: str = "rollout",
        pwca_detach_kv: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if getattr(backbone, "cls_token", None) is None:
            raise ConfigError(f"backbone {type(backbone).__name__} has no class token: DCAL reads the CLS output "
                              "of every branch (create it with class_token=True)")
        if getattr(backbone, "dynamic_img_size", False):
            raise ConfigError("backbone: dynamic_img_size=True is not supported (the rollout needs a fixed grid)")
        if not 0.0 < glca_ratio <= 1.0:
            raise ConfigError(f"glca_ratio must be in (0, 1], got {glca_ratio}")
        if glca_placement not in GLCA_PLACEMENTS:
            raise ConfigError(f"glca_placement must be one of {GLCA_PLACEMENTS}, got {glca_placement!r}")
        if glca_pool not in GLCA_POOLS:
            raise ConfigError(f"glca_pool must be one of {GLCA_POOLS}, got {glca_pool!r}")
        if glca_selection not in GLCA_SELECTIONS:
            raise ConfigError(f"glca_selection must be one of {GLCA_SELECTIONS}, got {glca_selection!r}")
        if glca_init not in GLCA_INITS:
            raise ConfigError(f"glca_init must be one of {GLCA_INITS}, got {glca_init!r}")
        for i, blk in enumerate(backbone.blocks):
            check_block(blk, f"backbone.blocks.{i}")
        if glca_placement == "parallel" and len(backbone.blocks) < 2:
            raise ConfigError("glca_placement='parallel' needs a backbone with at least 2 blocks")
        self.backbone = backbone
        self.glca_ratio = glca_ratio
        self.glca_placement = glca_placement
        self.pwca_enabled = pwca
        self.glca_selection = glca_selection
        self.pwca_detach_kv = pwca_detach_kv
        self.grad_checkpointing = grad_checkpointing
        self.attention_tiling = True
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.grid_size = tuple(backbone.patch_embed.grid_size)
        self.patch_size = tuple(backbone.patch_embed.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_local = max(1, math.floor(glca_ratio * self.num_patches))
        self.glca = self._make_glca(glca_init, glca_pool) if glca else None

    # ----------------------------------------------------------------- construction
    def _make_glca(self, init: str, pool: str) -> GLCA:
        bb = self.backbone
        glca = GLCA(copy.deepcopy(bb.blocks[-1]), copy.deepcopy(bb.norm), copy.deepcopy(bb.head), pool=pool)
        if init == "random":
            _init_like_timm(glca)
        return glca

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def attention_tiling(self) -> bool:
        """Whether, on CPU, the explicit attention weights run one head at a time, in tiles (see the class)."""
        return self._attention_tiling

    @attention_tiling.setter
    def attention_tiling(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise ConfigError(f"DCAL.attention_tiling must be a bool, got {type(on).__name__} {on!r}")
        self._attention_tiling = on

    # ----------------------------------------------------------------- forward
    def _run(self, fn, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _run_sa(self, block: nn.Module, h: Tensor, need_weights: bool, cls_row: bool):
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return sa_block(block, h, need_weights, self.attention_tiling, cls_row)
        # The attention weights are a no-grad side output: compute them in the forward pass only, not again
        # when backward recomputes the block (which would redo q·kᵀ and the softmax for nothing).
        first = [True]

        def fn(t: Tensor):
            nw, first[0] = need_weights and first[0], False
            return sa_block(block, t, nw, self.attention_tiling, cls_row)

        return checkpoint(fn, h, use_reentrant=False)

    def forward(self, x: Tensor, pair_index: Tensor | None = None, *, pwca_attention: bool = False) -> DCALOutput:
        """Run SA (+ GLCA) (+ PWCA in training). `pair_index` (B,) overrides the random derangement.

        ``pwca_attention=True`` (for diagnostics, e.g. `diagnostics.pwca_distractor_mass`) runs the PWCA stream
        also in eval mode or with ``pwca=False`` (it has no parameters) and returns its head-mean attention
        weights per block in `DCALOutput.pwca_attention`; those blocks are not checkpointed.
        """
        bb = self.backbone
        B = x.shape[0]
        use_pwca = (self.pwca_enabled and self.training) or pwca_attention
        if use_pwca:
            pair_index = self._pairs(B, x.device, pair_index)
        blocks = list(bb.blocks)
        L = len(blocks)
        rollout_depth = L if self.glca_placement == "stacked" else L - 1

        h = embed_tokens(bb, x)  # (B, N, C)
        h_pw = h
        weights: list[Tensor] = []
        sums: list[Tensor] = []
        pwca_weights: list[Tensor] = []
        glca_input = None
        for i, blk in enumerate(blocks):
            need_w = i < rollout_depth
            if i == L - 1 and self.glca_placement == "parallel":
                glca_input = h
            # The chain starts from the CLS row of the last map it reads: that block needs no more (and keeps
            # the fused attention kernel).
            h, k, v, w = self._run_sa(blk, h, need_w, cls_row=i == rollout_depth - 1)
            if need_w:
                weights.append(w)
                sums.append(w.float().sum(dim=-1))  # while the map is in cache (see `attention_rollout`)
            if use_pwca:
                k2, v2 = k[pair_index], v[pair_index]  # (B, H, N, hd): image 2's K/V from this SA pass
                if self.pwca_detach_kv:
                    k2, v2 = k2.detach(), v2.detach()
                if pwca_attention:
                    h_pw, w_pw = pwca_block(blk, h_pw, k2, v2, need_weights=True,
                                             tiling=self.attention_tiling)  # w_pw (B, N, 2N)
                    pwca_weights.append(w_pw)
                else:
                    h_pw = self._run(lambda t, k_, v_, b=blk: pwca_block(b, t, k_, v_), h_pw, k2, v2)
        if glca_input is None:
            glca_input = h

        names = [f"backbone.blocks.{i}" for i in range(rollout_depth)]
        full = attention_rollout(weights, names, row_sums=sums)  # (B, N)
        rollout = full[:, self.num_prefix_tokens:]  # (B, P)
        local_index = select_local(rollout, self.num_local, self.glca_selection)  # (B, k)

        sa_logits = bb.forward_head(bb.norm(h))
        glca_logits = None
        if self.glca is not None:
            cls = torch.zeros(B, 1, dtype=torch.long, device=x.device)
            query_index = torch.cat([cls, local_index + self.num_prefix_tokens], dim=1)  # (B, 1+k)
            glca_logits = self.glca(glca_input, query_index)
        pwca_logits = bb.forward_head(bb.norm(h_pw)) if use_pwca else None
        return DCALOutput(sa_logits, glca_logits, pwca_logits, rollout, local_index,
                          pwca_weights if pwca_attention else None)

    def _pairs(self, B: int, device: torch.device, pair_index: Tensor | None) -> Tensor:
        if pair_index is None:
            if B < 2:
                raise ConfigError("PWCA is on but the micro-batch has 1 image: pairs need another image of the "
                                  "batch (use a micro-batch >= 2, or set pwca=False)")
            return derangement(B).to(device)
        if pair_index.shape != (B,) or pair_index.dtype != torch.long:
            raise ConfigError(f"pair_index must be a LongTensor of shape ({B},), got {pair_index.dtype} "
                              f"{tuple(pair_index.shape)}")
        if bool(((pair_index < 0) | (pair_index >= B)).any()):
            raise ConfigError(f"pair_index values must lie in 0..{B - 1}")
        return pair_index.to(device)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Fused class probabilities softmax(SA) + softmax(GLCA) (SA alone when GLCA is off): (B, C)."""
        with eval_mode(self):
            out = self(x)
        return fused_probs(out.sa_logits, out.glca_logits)

    # ----------------------------------------------------------------- timm's model contract
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that take no weight decay: the backbone's own list (position embedding,
        class/register tokens), under ``backbone.``; GLCA adds none. timm's `param_groups_weight_decay`
        reads it (and excludes every 1-D parameter besides), as `dcal.param_groups` does."""
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the SA and PWCA blocks in backward (the ``grad_checkpointing`` switch, timm's name);
        the backbone's own flag follows, so `forward_features` checkpoints too. Outputs are unchanged."""
        self.grad_checkpointing = enable
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x: Tensor) -> Tensor:
        """timm's first stage, for the SA branch: the tokens after the final norm, (B, N, C), exactly
        ``self.backbone.forward_features(x)``. DCAL's other branches need the rollout (GLCA) and the pairs
        (PWCA), which only `forward` computes; their logits are in `forward`'s `DCALOutput`."""
        return self.backbone.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's second stage, for the SA branch: `forward_features`' tokens → SA logits (B, num_classes),
        or the pooled features (B, C) with ``pre_logits=True``; equal to `forward(x).sa_logits` in eval."""
        return self.backbone.forward_head(x, pre_logits=pre_logits)

    def hook_points(self) -> dict[str, nn.Module]:
        """The modules to register forward hooks on, per attention, by name: each ``attn.proj``.

        `dcal.layers` runs timm's `Attention` stage by stage, calling `attn.qkv` and `attn.proj` directly:
        ``attn.forward`` (and ``attn.attn_drop`` on the fused path) never runs, so hooks on the ``attn``
        modules themselves, as attention-visualisation tools register them, see nothing. ``attn.proj`` is
        called by every branch (SA and PWCA in each backbone block, GLCA in its block); its input is the
        heads' merged output (B, Nq, C). (``attn.qkv`` is called by SA and PWCA only: GLCA splits its
        weight into query and key/value projections.) For where attention goes, read `DCALOutput.rollout`.
        """
        points = {f"backbone.blocks.{i}.attn.proj": blk.attn.proj for i, blk in enumerate(self.backbone.blocks)}
        if self.glca is not None:
            points["glca.block.attn.proj"] = self.glca.block.attn.proj
        return points

    def extra_repr(self) -> str:
        return (f"glca={self.glca is not None}, pwca={self.pwca_enabled}, glca_ratio={self.glca_ratio}, "
                f"k={self.num_local}/{self.num_patches}, placement={self.glca_placement}, selection={self.glca_selection}")


def build_model(
    backbone: str,
    *,
    num_classes: int,
    img_size: int,
    pretrained: bool | str = False,
    glca: bool = True,
    pwca: bool = True,
    glca_ratio: float = 0.1,
    glca_placement: str = "stacked",
    drop_path_rate: float = 0.1,
    glca_init: str | None = None,
    glca_pool: str = "mean",
    glca_selection: str = "rollout",
    pwca_detach_kv: bool = False,
    grad_checkpointing: bool = False,
    **timm_kwargs,
) -> DCAL:
    """Create DCAL on the timm ViT/DeiT `backbone` (e.g. ``"deit_tiny_patch16_224"``).

    Args:
        backbone: any timm VisionTransformer name with a class token.
        num_classes, img_size, drop_path_rate: passed to `timm.create_model`.
        pretrained: False; True (timm's own download); or a path to a local ``.safetensors``/``.pth``
            timm checkpoint (position embedding resampled, a mismatched head dropped).
        glca_init: ``"copy"`` or ``"random"``; default ``"copy"`` when pretrained, else ``"random"``.
        timm_kwargs: any other `timm.create_model` argument (e.g. ``patch_size``, ``embed_dim``, ``depth``).
    """
    if not isinstance(img_size, int) or img_size <= 0:
        raise ConfigError(f"img_size must be a positive int, got {img_size!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 < glca_ratio <= 1.0:
        raise ConfigError(f"glca_ratio must be in (0, 1], got {glca_ratio}")
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        raise ConfigError(f"model.backbone: unknown timm model {backbone!r}" + (f" (did you mean one of {close}?)" if close else ""))
    family = timm.models.model_entrypoint(backbone).__module__.rsplit(".", 1)[-1]
    if family not in _VIT_FAMILIES:
        raise ConfigError(f"model.backbone: {backbone!r} is not a ViT/DeiT (timm VisionTransformer); it is a "
                          f"timm '{family}' model. Use a ViT/DeiT name, e.g. 'deit_tiny_patch16_224'")
    from_file = isinstance(pretrained, (str, bytes)) or hasattr(pretrained, "__fspath__")
    kwargs = dict(num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path_rate, **timm_kwargs)
    try:
        net = timm.create_model(backbone, pretrained=bool(pretrained) and not from_file, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"model.backbone: timm could not create {backbone!r} with {kwargs}: {e}") from e
    if not isinstance(net, VisionTransformer):
        raise ConfigError(f"model.backbone: {backbone!r} is not a ViT/DeiT (timm VisionTransformer)")
    patch = tuple(net.patch_embed.patch_size)
    if img_size % patch[0] or img_size % patch[1]:
        raise ConfigError(f"img_size {img_size} is not divisible by the patch size {patch} of {backbone!r}")
    if from_file:
        load_pretrained(net, pretrained)
    if glca_init is None:
        glca_init = "copy" if pretrained else "random"
    return DCAL(net, glca=glca, pwca=pwca, glca_ratio=glca_ratio, glca_placement=glca_placement,
                glca_init=glca_init, glca_pool=glca_pool, glca_selection=glca_selection, pwca_detach_kv=pwca_detach_kv, grad_checkpointing=grad_checkpointing)
