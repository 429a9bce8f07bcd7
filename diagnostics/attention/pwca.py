"""PWCA's attention on the paired image: `pwca_distractor_mass` (per block, image 1's softmax mass on
image 2's keys) and `plot_pwca_mass`."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from dcal.model import DCAL, eval_mode

from .checks import _as_tensor


@torch.no_grad()
def pwca_distractor_mass(model: DCAL, x: Tensor, pair_index: Tensor) -> dict[str, Tensor]:
    """Per PWCA block, the share of image 1's attention that falls on image 2's keys.

    Asks the model: ``model(x, pair_index, pwca_attention=True)`` in eval mode (no dropout, no drop-path),
    fp32, without gradients, returns the head-mean PWCA weights of every block, a softmax over [K1; K2]
    (2N keys); the mass is the sum of a row over the second half. The training flag is restored afterwards
    and no parameter is touched.

    Args:
        model: a `dcal.DCAL` (PWCA need not be enabled: the stream has no parameters).
        x: (B, C, H, W) images 1.
        pair_index: (B,) long, image 2 of row b is ``x[pair_index[b]]`` (the model checks it). ``arange(B)``
            (self-pairs) gives exactly 0.5 at every block.

    Returns:
        ``{"all": (B, L), "cls": (B, L)}``: the mass averaged over heads and all query tokens, and over
        heads for the CLS query alone.
    """
    if not isinstance(model, DCAL):
        raise TypeError(f"model must be a dcal.DCAL, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) Tensor, got {getattr(x, 'shape', type(x).__name__)}")
    dev = next(model.parameters()).device
    with eval_mode(model), torch.autocast(dev.type, enabled=False):
        out = model(x.to(dev).float(), pair_index.to(dev) if isinstance(pair_index, Tensor) else pair_index,
                    pwca_attention=True)
    N = out.pwca_attention[0].shape[1]
    m = torch.stack([w[..., N:].sum(dim=-1) for w in out.pwca_attention], dim=1)  # (B, L, N): mass per query
    return {"all": m.mean(dim=-1).cpu(), "cls": m[..., 0].cpu()}  # CLS is token 0 in timm ViTs


def plot_pwca_mass(mass, *, ax_title: str | None = None) -> Figure:
    """Attention mass on the paired image per PWCA block: batch mean with its min–max band.

    Args:
        mass: the dict from `pwca_distractor_mass`, or one (B, L) / (L,) tensor or array.
    """
    series = mass if isinstance(mass, dict) else {"mass": mass}
    if not series:
        raise ValueError("mass is an empty dict")
    labels = {"all": "all queries", "cls": "CLS query"}
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    L = None
    for name, m in series.items():
        t = _as_tensor(m, f"mass[{name!r}]").float()
        if t.dim() == 1:
            t = t.unsqueeze(0)  # (1, L)
        if t.dim() != 2 or t.shape[1] < 1:
            raise ValueError(f"mass[{name!r}] must be (B, L) or (L,), got {tuple(t.shape)}")
        if L is not None and t.shape[1] != L:
            raise ValueError(f"mass[{name!r}] has {t.shape[1]} blocks, the other series {L}")
        L = t.shape[1]
        if not torch.isfinite(t).all() or bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"mass[{name!r}] must hold fractions in [0, 1]")
        xs = np.arange(L)
        (line,) = ax.plot(xs, t.mean(dim=0).numpy(), marker="o", label=labels.get(name, name))
        if t.shape[0] > 1:
            ax.fill_between(xs, t.min(dim=0).values.numpy(), t.max(dim=0).values.numpy(), alpha=0.2,
                            color=line.get_color())
    ax.axhline(0.5, color="gray", ls=":", lw=1, label="0.5 (self-pair)")
    ax.set_ylim(0, 1)
    ax.set_xticks(np.arange(L))
    ax.set_xlabel("PWCA block")
    ax.set_ylabel("attention mass on image 2")
    ax.set_title(ax_title or "PWCA: share of attention on the paired image", fontsize=9)
    ax.legend(fontsize=8)
    return fig
