"""Command line: `dcal demo | train | eval | make-dataset | pretrain | doctor` (argparse lives here only)."""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import dcal

    torch.manual_seed(0)
    model = dcal.build_model("vit_tiny_patch16_224", num_classes=10, img_size=64, patch_size=8,
                             embed_dim=96, depth=4, num_heads=3).train()
    loss_fn = dcal.UncertaintyLoss(3)
    x, y = torch.randn(4, 3, 64, 64), torch.arange(4)
    out = model(x)
    losses = [F.cross_entropy(t, y) for t in (out.sa_logits, out.glca_logits, out.pwca_logits)]
    total = loss_fn(losses)
    total.backward()
    print(model.extra_repr())
    print(f"sa_logits {tuple(out.sa_logits.shape)}  glca_logits {tuple(out.glca_logits.shape)}  "
          f"pwca_logits {tuple(out.pwca_logits.shape)}")
    print(f"rollout {tuple(out.rollout.shape)}  local_index (k={model.num_local}):")
    for i, row in enumerate(out.local_index.tolist()):
        print(f"  image {i}: patches {row}")
    print("branch losses " + ", ".join(f"{n}={v.item():.4f}" for n, v in zip(("sa", "glca", "pwca"), losses)))
    print(f"uncertainty-weighted loss {total.item():.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="one forward/backward pass of a small DCAL on a synthetic batch")
    args = parser.parse_args(argv)
    return {"demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
