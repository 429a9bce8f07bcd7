"""dcal: Dual Cross-Attention Learning (CVPR 2022) on timm ViT/DeiT backbones.

The public names load on first use (module ``__getattr__``, PEP 562): importing a torch-free submodule
(``dcal.errors``, ``dcal.branches``, ``dcal.schedule``'s rules) does not import torch, so tools that only
read logs (``dcal doctor``) start fast. ``dcal.X`` works as before.
"""
import importlib
import importlib.util

__version__ = "0.1.0"

# public name → the submodule that defines it
_LAZY = {
    "CheckpointError": ".errors", "ConfigError": ".errors", "NonFiniteLossError": ".errors", "RolloutError": ".errors",
    "attention_rollout": ".layers", "UncertaintyLoss": ".loss", "param_groups": ".loss",
    "DCAL": ".model", "GLCA": ".model", "DCALOutput": ".model", "build_model": ".model", "derangement": ".model",
    "eval_mode": ".model", "fused_probs": ".model",
}

__all__ = [
    "DCAL", "GLCA", "DCALOutput", "build_model", "derangement", "eval_mode", "fused_probs", "attention_rollout",
    "UncertaintyLoss", "param_groups",
    "ConfigError", "RolloutError", "CheckpointError", "NonFiniteLossError",
]


def __getattr__(name: str):
    if name not in _LAZY:
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'dcal' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)  # a submodule: dcal.model, dcal.train, ...
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
