"""dcal: Dual Cross-Attention Learning (CVPR 2022) on timm ViT/DeiT backbones."""
from .errors import CheckpointError, ConfigError, NonFiniteLossError, RolloutError
from .layers import attention_rollout
from .loss import UncertaintyLoss, param_groups
from .model import DCAL, GLCA, DCALOutput, build_model, derangement, eval_mode, fused_probs

__version__ = "0.1.0"

__all__ = [
    "DCAL", "GLCA", "DCALOutput", "build_model", "derangement", "eval_mode", "fused_probs", "attention_rollout",
    "UncertaintyLoss", "param_groups",
    "ConfigError", "RolloutError", "CheckpointError", "NonFiniteLossError",
]
