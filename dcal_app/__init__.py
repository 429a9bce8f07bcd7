"""The application layer: every `dcal` command and the trainer's default callbacks.

Layers, bottom to top (checked by tests/test_layers.py): `dcal` (model, data, trainer) ← `diagnostics`
(tools for any training loop, plus DCAL's views) ← `dcal_app` (commands). `dcal_studies` (the notebooks'
study code) sits beside the app and may import both libraries; neither library imports it.
"""
__all__ = ["default_callbacks"]


def __getattr__(name: str):
    # `dcal doctor` must not pay for torch: the callbacks (torch, diagnostics) load on first use (PEP 562).
    if name == "default_callbacks":
        from .callbacks import default_callbacks

        return default_callbacks
    raise AttributeError(f"module 'dcal_app' has no attribute {name!r}")
