"""What the benchmarks run: model configurations, training steps, inference calls, rollout variants."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import dcal
from dcal.flops import count_flops
from dcal.layers import attention_rollout, embed_tokens, sa_block
from dcal.loss import BRANCHES, branch_losses

__all__ = ["Case", "CASES", "TrainStep", "make_train_step", "flops_of", "full_product_rollout", "random_maps",
           "inference_stages"]


@dataclass(frozen=True)
class Case:
    """One model configuration; the targets are the CPU ratios DCAL should stay under (None: report only)."""

    name: str
    backbone: str
    img_size: int
    batch: int
    num_classes: int
    timm_kwargs: dict = field(default_factory=dict)
    train_target: float | None = None  # training step DCAL / SA
    infer_target: float | None = None  # inference DCAL.predict / timm forward

    def build(self, device: torch.device, **kw) -> dcal.DCAL:
        torch.manual_seed(0)  # the same backbone weights for DCAL and SA
        return dcal.build_model(self.backbone, num_classes=self.num_classes, img_size=self.img_size,
                                **self.timm_kwargs, **kw).to(device)

    def batch_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(self.batch, 3, self.img_size, self.img_size, generator=g)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=g)
        return x.to(device), y.to(device)

    @property
    def label(self) -> str:
        return f"{self.backbone} {self.img_size}px b{self.batch}"


_DEMO = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3)
CASES = {
    "deit224": Case("deit224", "deit_tiny_patch16_224", 224, 8, 200, train_target=2.2, infer_target=1.08),
    "deit448": Case("deit448", "deit_tiny_patch16_224", 448, 2, 200, train_target=2.6, infer_target=1.25),
    "demo": Case("demo", "vit_tiny_patch16_224", 64, 32, 10, _DEMO),
    # For the smoke test only: seconds, not minutes.
    "tiny": Case("tiny", "vit_tiny_patch16_224", 32, 4, 5, dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)),
}


@dataclass
class TrainStep:
    """One optimiser step of `model` on a fixed batch; DCAL sums its three CE losses with UncertaintyLoss."""

    model: dcal.DCAL
    x: Tensor
    y: Tensor
    loss_fn: dcal.UncertaintyLoss | None
    optimizer: torch.optim.Optimizer
    last: dict | None = None

    def losses(self) -> dict[str, Tensor]:
        return _named_losses(self.model(self.x), self.y)

    def forward_backward(self) -> dict[str, Tensor]:
        branch = self.losses()
        total = self.loss_fn(list(branch.values())) if self.loss_fn is not None else branch["sa"]
        total.backward()
        return {"loss": total, **{f"loss_{k}": v for k, v in branch.items()}}

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.last = self.forward_backward()
        self.optimizer.step()

    def with_events(self, callback, trainer) -> None:
        """The same step, announcing the trainer's events to `callback` (see `dcal.callbacks`)."""
        trainer.record, trainer.micro_step = {}, 0
        callback.before_batch(trainer)
        self.optimizer.zero_grad(set_to_none=True)
        trainer.outputs = out = self.model(self.x)
        callback.after_forward(trainer)
        trainer.branch_losses = _named_losses(out, self.y)
        trainer.loss = self.loss_fn(list(trainer.branch_losses.values()))
        callback.after_loss(trainer)
        trainer.loss.backward()
        callback.after_backward(trainer)
        callback.before_step(trainer)
        self.optimizer.step()
        callback.after_step(trainer)
        trainer.step += 1

    def resident(self) -> list[Tensor]:
        """Tensors alive between steps: parameters, gradients, buffers, optimiser state, the batch."""
        mods = [self.model] + ([self.loss_fn] if self.loss_fn is not None else [])
        ts = [self.x, self.y]
        for m in mods:
            ts += list(m.parameters()) + list(m.buffers())
            ts += [p.grad for p in m.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            ts += [v for v in state.values() if isinstance(v, Tensor)]
        return ts


def _named_losses(out: dcal.DCALOutput, y: Tensor) -> dict[str, Tensor]:
    """`dcal.loss.branch_losses` of the branches present in `out`, by name."""
    names = [b for b in BRANCHES if getattr(out, f"{b}_logits") is not None]
    return dict(zip(names, branch_losses(out, y, names), strict=True))


def make_train_step(case: Case, device: torch.device, dcal_branches: bool, **kw) -> TrainStep:
    """DCAL (GLCA + PWCA, UncertaintyLoss(3)) or the SA-only model built by the same code (CE on SA)."""
    model = case.build(device, glca=dcal_branches, pwca=dcal_branches, **kw).train()
    loss_fn = dcal.UncertaintyLoss(3).to(device) if dcal_branches else None
    opt = torch.optim.AdamW(dcal.param_groups(model, loss_fn, weight_decay=0.05), lr=1e-5)
    x, y = case.batch_on(device)
    return TrainStep(model, x, y, loss_fn, opt)


def flops_of(fn: Callable[[], object]) -> int:
    """Total FLOPs of one call (`dcal.flops.count_flops`, CPU fused attention included)."""
    return count_flops(fn)["Global"]


def random_maps(batch: int, tokens: int, depth: int, device: torch.device) -> list[Tensor]:
    """`depth` row-stochastic (B, N, N) fp32 maps, standing in for the head-mean attention weights."""
    g = torch.Generator().manual_seed(2)
    return [torch.rand(batch, tokens, tokens, generator=g).softmax(-1).to(device) for _ in range(depth)]


@torch.no_grad()
def full_product_rollout(maps: list[Tensor], residual: float = 0.5) -> Tensor:
    """The textbook rollout Ŝ = S̄_L ⋯ S̄_1 with full (B, N, N) matrix products; its CLS row (B, N)."""
    B, N, _ = maps[0].shape
    eye = torch.eye(N, device=maps[0].device)
    acc = None
    for s in maps:
        sb = (1.0 - residual) * s + residual * eye  # (B, N, N)
        sb = sb / sb.sum(-1, keepdim=True)
        acc = sb if acc is None else sb @ acc
    return acc[:, 0]


def chain_rollout(maps: list[Tensor]) -> Tensor:
    """Our rollout: the CLS-row chain (`dcal.attention_rollout`), O(L·N²)."""
    return attention_rollout(maps)


def inference_stages(model: dcal.DCAL, x: Tensor) -> dict[str, Callable[[], object]]:
    """`DCAL.predict`'s work in cumulative stages, each a call (eval, no_grad), for the inference breakdown:

    - ``timm``: the plain timm forward of the same weights;
    - ``weights``: the SA blocks as DCAL runs them, each also computing its head-mean attention weights (of
      the last block read by the rollout, the CLS row), and the SA head;
    - ``rollout``: that plus the CLS-row chain over those maps;
    - ``predict``: `DCAL.predict` (that plus the top-k selection, GLCA and the fused probabilities).
    """
    bb = model.backbone
    depth = len(bb.blocks) if model.glca_placement == "stacked" else len(bb.blocks) - 1

    def sa(rollout: bool) -> Tensor:
        h, maps, sums = embed_tokens(bb, x), [], []
        for i, blk in enumerate(bb.blocks):
            h, _, _, w = sa_block(blk, h, i < depth, model.attention_tiling, cls_row=i == depth - 1)
            if w is not None:
                maps.append(w)  # kept to the end in both stages, as `DCAL.forward` keeps them
                if rollout:
                    sums.append(w.sum(dim=-1))  # as `DCAL.forward` takes them
        if rollout:
            attention_rollout(maps, row_sums=sums)
        return bb.forward_head(bb.norm(h))

    return {"timm": lambda: bb(x), "weights": lambda: sa(False), "rollout": lambda: sa(True),
            "predict": lambda: model.predict(x)}
