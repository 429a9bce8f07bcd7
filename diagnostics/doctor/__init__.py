"""The run doctor: reads a run folder or any training log and says what went wrong, with the numbers.

`diagnose(path)` returns a list of `Finding`s. A run folder needs only metrics.jsonl; config.yaml, when
present, adds the checks that need it (the LR rule, the optimiser, the clamp bounds, the warm-up length, the
model's shape). Any other log is read by `diagnostics.import_log` (text, CSV, JSON lines, TensorBoard).

One module per concern: `reading` (the input), `findings` (`Finding`, `CODES`), `rules` (every threshold
with its rule and why: the page to cite for what a finding means), the checks (`checks_records`,
`checks_learning`, `checks_dynamics`, `checks_training` for any classifier's curves, `checks_crash`; `checks`
runs them all) and the reports (`report_text`, `report_html`). Every public name is re-exported here.
The ``dcal doctor PATH [...]`` command is `dcal_app.doctor.main` (exit status 0 clean, 1 an error finding,
2 nothing readable, 3 an internal failure).
"""
from . import rules
from .checks import diagnose, diagnose_log, import_finding, model_shape, skipped_checks
from .checks_crash import OOM_ROUNDING_BYTES, match_attention_maps
from .checks_training import check_accuracy_regression, check_divergence, check_overfitting, check_unstable
from .common import ModelShape
from .findings import CODES, SEVERITIES, Finding
from .reading import read_log
from .report_text import format_summary, format_text, summarize, to_json
from .rules import (  # every threshold, each with its rule
    ACC_FALL_FRACTION,
    BOUND_ATOL,
    CHANCE_ACC_FACTOR,
    CHANCE_ACC_OVERRULES,
    CHANCE_LOSS_FRACTION,
    CHANCE_MIN_LATE_RECORDS,
    CHANCE_W_TOLERANCE,
    COLLAPSE_FRACTION,
    DIVERGENCE_GROWTH_FACTOR,
    DIVERGENCE_LNC_FACTOR,
    DIVERGENCE_MIN_RECORDS,
    DIVERGENCE_T_STAT,
    EQUILIBRIUM_W_TOLERANCE,
    FROZEN_MIN_FRACTION,
    FROZEN_MIN_STEPS,
    LAG_MIN_GAP,
    LAG_MIN_RECORDS,
    LAG_SAME_DIRECTION,
    LAG_SPEED_RANGE,
    LATE_FRACTION,
    LR_FLAT_TOLERANCE,
    LR_RULE_RATIO,
    MEM_ERROR_FRACTION,
    MEM_MIN_GROWTH_FRACTION,
    MEM_MIN_GROWTH_MB,
    MEM_MIN_POINTS,
    MEM_SKIP_FRACTION,
    MEM_T_STAT,
    OOM_EDGE_FRACTION,
    OVERFIT_ACC_STILL_GAINS,
    OVERFIT_GAP_MIN,
    OVERFIT_GAP_WIDENING,
    OVERFIT_MIN_EVALS,
    OVERFIT_MIN_RISE_FRACTION,
    OVERFIT_MIN_RISE_SCALE,
    OVERFIT_TRAIN_FALL,
    OVERFIT_VAL_STALL,
    PINNED_MIN_FRACTION,
    PINNED_MIN_STEPS,
    REGRESSION_MIN_DROP,
    REGRESSION_MIN_EVALS,
    REGRESSION_MIN_FRACTION,
    RISE_MIN_FRACTION,
    RISE_MIN_RECORDS,
    RISE_MIN_RUN_FRACTION,
    RISE_SMOOTH_DIVISOR,
    RISE_T_STAT,
    TRUNCATED_STEP_FRACTION,
    UNSTABLE_MIN_RECORDS,
    UNSTABLE_SIGN_CHANGES,
    UNSTABLE_SWING,
    UNSTABLE_T_STAT,
)


def __getattr__(name: str):
    # The HTML report draws figures with matplotlib: it loads on first use, so `dcal doctor` without --html
    # (and `import diagnostics.doctor`) stays light.
    if name == "write_html":
        from .report_html import write_html

        return write_html
    raise AttributeError(f"module 'diagnostics.doctor' has no attribute {name!r}")


__all__ = ["Finding", "SEVERITIES", "CODES", "ModelShape", "diagnose", "diagnose_log", "read_log", "summarize",
           "format_text", "format_summary", "to_json", "write_html", "import_finding", "skipped_checks",
           "model_shape", "match_attention_maps", "OOM_ROUNDING_BYTES", "rules", "check_overfitting",
           "check_accuracy_regression", "check_divergence", "check_unstable",
           "LATE_FRACTION", "CHANCE_ACC_FACTOR", "CHANCE_LOSS_FRACTION", "CHANCE_MIN_LATE_RECORDS",
           "CHANCE_ACC_OVERRULES", "CHANCE_W_TOLERANCE", "EQUILIBRIUM_W_TOLERANCE",
           "COLLAPSE_FRACTION", "REGRESSION_MIN_DROP", "REGRESSION_MIN_FRACTION", "REGRESSION_MIN_EVALS",
           "OVERFIT_MIN_EVALS", "OVERFIT_MIN_RISE_FRACTION", "OVERFIT_MIN_RISE_SCALE",
           "OVERFIT_TRAIN_FALL", "OVERFIT_ACC_STILL_GAINS", "OVERFIT_GAP_MIN", "OVERFIT_GAP_WIDENING", "OVERFIT_VAL_STALL",
           "DIVERGENCE_LNC_FACTOR", "DIVERGENCE_GROWTH_FACTOR", "DIVERGENCE_MIN_RECORDS",
           "DIVERGENCE_T_STAT", "UNSTABLE_MIN_RECORDS", "UNSTABLE_SWING", "UNSTABLE_SIGN_CHANGES",
           "UNSTABLE_T_STAT", "TRUNCATED_STEP_FRACTION", "RISE_MIN_RECORDS", "RISE_MIN_RUN_FRACTION",
           "RISE_MIN_FRACTION", "RISE_T_STAT", "LR_FLAT_TOLERANCE", "ACC_FALL_FRACTION",
           "RISE_SMOOTH_DIVISOR", "LAG_MIN_RECORDS", "LAG_SPEED_RANGE", "LAG_SAME_DIRECTION",
           "LAG_MIN_GAP", "BOUND_ATOL", "PINNED_MIN_STEPS", "PINNED_MIN_FRACTION", "FROZEN_MIN_STEPS",
           "FROZEN_MIN_FRACTION", "LR_RULE_RATIO", "MEM_SKIP_FRACTION", "MEM_MIN_POINTS", "MEM_T_STAT",
           "MEM_MIN_GROWTH_MB", "MEM_MIN_GROWTH_FRACTION", "MEM_ERROR_FRACTION", "OOM_EDGE_FRACTION"]
