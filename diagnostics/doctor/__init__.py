"""The run doctor: reads a run folder or any training log and says what went wrong, with the numbers.

`diagnose(path)` returns a list of `Finding`s. A run folder needs only metrics.jsonl; config.yaml, when
present, adds the checks that need it (the LR rule, the optimiser, the clamp bounds, the warm-up length, the
model's shape). Any other log is read by `diagnostics.import_log` (text, CSV, JSON lines, TensorBoard).

One module per concern: `reading` (the input), `findings` (`Finding`, `CODES`), the checks
(`checks_records`, `checks_learning`, `checks_dynamics`, `checks_crash`; `checks` runs them all), the
reports (`report_text`, `report_html`) and the command (`cli`). Every public name is re-exported here.

`main(argv)` is the ``dcal doctor PATH [...]`` command: exit status 1 when a finding is an error, 0
otherwise, 2 when the input cannot be read.
"""
from .checks import diagnose, diagnose_log, import_finding, model_shape, skipped_checks
from .checks_crash import OOM_EDGE_FRACTION, OOM_ROUNDING_BYTES, match_attention_maps
from .checks_dynamics import (
    ACC_FALL_FRACTION,
    LAG_MIN_GAP,
    LAG_MIN_RECORDS,
    LAG_SAME_DIRECTION,
    LAG_SPEED_RANGE,
    LR_FLAT_TOLERANCE,
    RISE_MIN_FRACTION,
    RISE_MIN_RECORDS,
    RISE_MIN_RUN_FRACTION,
    RISE_T_STAT,
)
from .checks_learning import (
    BOUND_ATOL,
    CHANCE_ACC_FACTOR,
    COLLAPSE_FRACTION,
    EQUILIBRIUM_W_TOLERANCE,
    FROZEN_MIN_FRACTION,
    FROZEN_MIN_STEPS,
    LR_RULE_RATIO,
    PINNED_MIN_FRACTION,
    PINNED_MIN_STEPS,
)
from .checks_records import (
    MEM_ERROR_FRACTION,
    MEM_MIN_GROWTH_FRACTION,
    MEM_MIN_GROWTH_MB,
    MEM_MIN_POINTS,
    MEM_SKIP_FRACTION,
    MEM_T_STAT,
)
from .common import LATE_FRACTION, ModelShape
from .findings import CODES, SEVERITIES, Finding
from .reading import read_log
from .report_text import format_summary, format_text, summarize, to_json


def __getattr__(name: str):
    # The HTML report draws figures with matplotlib: it loads on first use, so `dcal doctor` without --html
    # (and `import diagnostics.doctor`) stays light.
    if name == "write_html":
        from .report_html import write_html

        return write_html
    raise AttributeError(f"module 'diagnostics.doctor' has no attribute {name!r}")


__all__ = ["Finding", "SEVERITIES", "CODES", "ModelShape", "diagnose", "diagnose_log", "read_log", "summarize",
           "format_text", "format_summary", "to_json", "write_html", "import_finding", "skipped_checks",
           "model_shape", "match_attention_maps",
           "LATE_FRACTION", "CHANCE_ACC_FACTOR", "COLLAPSE_FRACTION", "BOUND_ATOL", "PINNED_MIN_STEPS",
           "PINNED_MIN_FRACTION", "FROZEN_MIN_STEPS", "FROZEN_MIN_FRACTION", "LR_RULE_RATIO",
           "EQUILIBRIUM_W_TOLERANCE", "MEM_SKIP_FRACTION", "MEM_MIN_POINTS", "MEM_T_STAT", "MEM_MIN_GROWTH_MB",
           "MEM_MIN_GROWTH_FRACTION", "MEM_ERROR_FRACTION", "LAG_MIN_RECORDS", "LAG_SPEED_RANGE",
           "LAG_SAME_DIRECTION", "LAG_MIN_GAP", "RISE_MIN_RECORDS", "RISE_MIN_FRACTION", "RISE_T_STAT",
           "RISE_MIN_RUN_FRACTION", "LR_FLAT_TOLERANCE", "ACC_FALL_FRACTION", "OOM_ROUNDING_BYTES",
           "OOM_EDGE_FRACTION"]
