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
from .rules import *  # noqa: F403  every threshold, each with its rule (their names: rules.__all__)


def __getattr__(name: str):
    # The HTML report draws figures with matplotlib: it loads on first use, so `dcal doctor` without --html
    # (and `import diagnostics.doctor`) stays light.
    if name == "write_html":
        from .report_html import write_html

        return write_html
    raise AttributeError(f"module 'diagnostics.doctor' has no attribute {name!r}")


__all__ = ["Finding", "SEVERITIES", "CODES", "ModelShape", "diagnose", "diagnose_log", "read_log", "summarize",
           "format_text", "format_summary", "to_json", "write_html", "import_finding", "skipped_checks",  # noqa: F405 (write_html: lazy)
           "model_shape", "match_attention_maps", "OOM_ROUNDING_BYTES", "rules", "check_overfitting",
           "check_accuracy_regression", "check_divergence", "check_unstable", *rules.__all__]
