"""diagnostics: find out why a DCAL (or any timm ViT) training run goes wrong.

Every tool works standalone (a context manager or a function) and as a `dcal.callbacks.Callback`;
plotting helpers are pure (data in, a matplotlib Figure out); nothing here changes the model's numbers.
"""
from . import doctor
from .attention import (
    RolloutCallback,
    dcal_rollout,
    plot_compare,
    plot_pwca_mass,
    plot_rollout,
    pwca_distractor_mass,
    rollout_heatmap,
)
from .capture import (
    AttentionCapture,
    AttentionCaptureError,
    attention_rollout,
    capture_attention,
    vit_rollout,
)
from .curves import (
    lr_rule_table,
    plot_curves,
    plot_lr_rules,
    plot_lr_schedule,
    plot_uncertainty,
    uncertainty_reading,
    uncertainty_state,
)
from .doctor import Finding, diagnose
from .logimport import LogImportError, import_log
from .memory import (
    LeakDetector,
    MemoryCallback,
    MemoryProfiler,
    attention_memory,
    count_graph_tensors,
    find_graph_holders,
    oom_snapshot,
    predict_step_memory,
    record_history,
)
from .nonfinite import NonFiniteCallback, NonFiniteDetector, NonFiniteError, describe_tensor, finite_checks
from .runlog import RunLog, RunLogError, load_run, read_metrics
from .selection import (
    random_selection,
    selection_jaccard,
    selection_onehot,
    selection_stats,
)
from .watch import Watch, watch

# The widgets import IPython and ipywidgets, which a training run never needs: they load on first use
# (module __getattr__, PEP 562), so `import diagnostics` (done by every `dcal train`) stays light.
_LAZY = {"RunExplorer": ".widgets", "run_explorer": ".widgets", "RolloutExplorer": ".widgets_rollout",
         "rollout_explorer": ".widgets_rollout"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "RolloutCallback", "plot_compare", "plot_pwca_mass", "plot_rollout", "pwca_distractor_mass", "rollout_heatmap",
    "random_selection", "selection_jaccard", "selection_onehot", "selection_stats",
    "RolloutExplorer", "rollout_explorer",
    "doctor", "Finding", "diagnose", "import_log", "LogImportError", "RunLog", "RunLogError", "load_run", "read_metrics",
    "lr_rule_table", "plot_curves", "plot_lr_rules", "plot_lr_schedule", "plot_uncertainty",
    "uncertainty_reading", "uncertainty_state", "RunExplorer", "run_explorer",
    "LeakDetector", "MemoryCallback", "MemoryProfiler", "attention_memory", "count_graph_tensors",
    "predict_step_memory",
    "find_graph_holders", "oom_snapshot", "record_history",
    "NonFiniteCallback", "NonFiniteDetector", "NonFiniteError", "describe_tensor", "finite_checks",
    "watch", "Watch", "capture_attention", "AttentionCapture", "AttentionCaptureError", "attention_rollout",
    "vit_rollout", "dcal_rollout",
]

