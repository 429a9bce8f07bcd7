"""Figures to bytes: the one PNG encoder the doctor's HTML report, the widgets and the callbacks share."""
from __future__ import annotations

import base64
import io

from matplotlib.figure import Figure

__all__ = ["png_bytes", "png_base64"]


def png_bytes(fig: Figure, dpi: int = 80) -> bytes:
    """Render `fig` to PNG bytes (the figure is left open: the caller owns it)."""
    if not isinstance(fig, Figure):
        raise TypeError(f"png_bytes needs a matplotlib Figure, got {type(fig).__name__}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def png_base64(fig: Figure, dpi: int = 80) -> str:
    """`png_bytes` as ASCII base64 (for ``data:`` URLs and Jupyter's ``image/png`` bundles)."""
    return base64.b64encode(png_bytes(fig, dpi)).decode("ascii")
