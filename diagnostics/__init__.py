"""diagnostics: find out why a DCAL (or any timm ViT) training run goes wrong.

Every tool works standalone (a context manager or a function) and as a `dcal.callbacks.Callback`;
plotting helpers are pure (data in, a matplotlib Figure out); nothing here changes the model's numbers.
"""
import importlib
import sys
import types

# Every public name loads on first use (module ``__getattr__``, PEP 562): `import diagnostics.doctor` (what
# `dcal doctor` runs) must not import torch, timm or matplotlib, and a training run never needs the widgets
# (IPython, ipywidgets). ``diagnostics.X`` works as before; public name → the submodule that defines it.
_LAZY = {
    **dict.fromkeys(("RolloutCallback", "dcal_rollout", "plot_compare", "plot_pwca_mass", "plot_rollout",
                     "pwca_distractor_mass", "rollout_heatmap"), ".attention"),
    **dict.fromkeys(("AttentionCapture", "AttentionCaptureError", "attention_rollout", "capture_attention",
                     "vit_rollout"), ".capture"),
    **dict.fromkeys(("lr_rule_table", "plot_curves", "plot_lr_rules", "plot_lr_schedule", "plot_uncertainty",
                     "uncertainty_reading", "uncertainty_state"), ".curves"),
    **dict.fromkeys(("Finding", "diagnose"), ".doctor"),
    **dict.fromkeys(("LogImportError", "import_log"), ".logimport"),
    **dict.fromkeys(("LeakDetector", "MemoryCallback", "MemoryProfiler", "attention_memory", "count_graph_tensors",
                     "find_graph_holders", "oom_snapshot", "predict_step_memory", "record_history"), ".memory"),
    **dict.fromkeys(("NonFiniteCallback", "NonFiniteDetector", "NonFiniteError", "describe_tensor",
                     "finite_checks"), ".nonfinite"),
    **dict.fromkeys(("RunLog", "RunLogError", "load_run", "read_metrics"), ".runlog"),
    **dict.fromkeys(("random_selection", "selection_jaccard", "selection_onehot", "selection_stats"), ".selection"),
    **dict.fromkeys(("Watch", "watch"), ".watch"),
    **dict.fromkeys(("DecayDominanceCallback", "coupled_decay", "decay_dominated_share", "magnitude_quantiles",
                     "share_below", "weight_sum_sq"), ".weights"),
    **dict.fromkeys(("RunExplorer", "run_explorer"), ".widgets"),
    **dict.fromkeys(("RolloutExplorer", "rollout_explorer"), ".widgets_rollout"),
}


def __getattr__(name: str):
    if name == "doctor":  # the subpackage (``diagnostics.doctor.CODES``)
        return importlib.import_module(".doctor", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"doctor"})


class _Package(types.ModuleType):
    """``diagnostics.watch`` is the function `watch`, as when this package imported it eagerly: importing the
    submodule ``diagnostics.watch`` sets the package attribute to the module, which would shadow it."""

    def __setattr__(self, name: str, value) -> None:
        if name == "watch" and isinstance(value, types.ModuleType) and hasattr(value, "watch"):
            value = value.watch
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["doctor", *_LAZY]  # every lazy name is public
