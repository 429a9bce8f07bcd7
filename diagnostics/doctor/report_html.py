"""The doctor's self-contained HTML report: summary, findings (skipped checks and import notes included),
the plots as embedded PNG (`diagnostics.figures.png_base64`), and the config or how the log was read."""
from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from dcal.schedule import lr_for_rule

from ..curves import DEFAULT_LOSSES, plot_curves, plot_lr_schedule, plot_uncertainty
from ..figures import png_base64
from ..runlog import RunLog, config_get
from ..stats import has_values
from .checks_learning import ACCURACY_COLUMNS
from .common import int_or_none
from .findings import Finding
from .reading import read_log
from .report_text import format_summary, summarize

__all__ = ["write_html"]

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
tr.error td:first-child{background:#f8d7da}tr.warning td:first-child{background:#fff3cd}tr.info td:first-child{background:#d1ecf1}
pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}code{font-size:90%}"""


def _lr_figure(log: RunLog):
    if "step" not in log.steps.columns or not has_values(log.steps, "lr"):
        raise ValueError("no lr in the step records")
    g = int_or_none(config_get(log.config, "derived", "global_batch"))
    return plot_lr_schedule(log.steps["lr"].to_numpy(dtype=float), steps=log.steps["step"].to_numpy(),
                            warmup_steps=int_or_none(config_get(log.config, "derived", "warmup_steps")),
                            reference_lr=lr_for_rule("linear", batch_size=g) if g else None)


def _curves_figure(log: RunLog):
    """The branch losses (or the total) and every accuracy the evals hold (an imported log's val_acc too)."""
    st, ev = log.steps, log.evals
    losses = [c for c in DEFAULT_LOSSES if has_values(st, c)] or [c for c in ("loss",) if has_values(st, c)]
    accs = [("eval/" + c if c in st.columns else c) for c in ACCURACY_COLUMNS if has_values(ev, c)]
    return plot_curves(log, metrics=(losses + accs) or None)


def _figures(log: RunLog) -> list[tuple[str, str | None, str]]:
    """(title, base64 PNG or None, note) for each plot of the report; a plot the log cannot feed is a note."""
    out = []
    makers = [("losses and accuracies", _curves_figure), ("uncertainty weights", plot_uncertainty),
              ("learning rate (as logged)", _lr_figure)]
    for title, make in makers:
        try:
            fig = make(log)
        except (ValueError, TypeError) as e:
            out.append((title, None, str(e)))
            continue
        out.append((title, png_base64(fig), ""))
    return out


def _source_section(log: RunLog) -> str:
    esc = html.escape
    if log.config:
        return f"<h2>Config</h2><pre>{esc(yaml.safe_dump(log.config, sort_keys=False))}</pre>"
    if log.source is None:
        return "<h2>Config</h2><p><em>no config.yaml in this run folder</em></p>"
    src = log.source
    body = {"format": src.format, "recognised": src.recognised, "unrecognised": src.unrecognised,
            "problems": [{"line": ln, "why": why} for ln, why in src.problems], "notes": src.notes,
            "settings": src.settings, "steps_per_epoch": log.steps_per_epoch_source}
    return (f"<h2>How the log was read</h2><pre>{esc(json.dumps(body, indent=1, ensure_ascii=False, default=str))}"
            "</pre>")


def write_html(run_dir: str | Path | RunLog, findings: Sequence[Finding], path: str | Path) -> Path:
    """A self-contained HTML report: summary, findings, the plots (embedded PNG), the config (or, for an
    imported log, how it was read). `run_dir`: a run folder, any log `import_log` reads, or a `RunLog`."""
    log = read_log(run_dir)
    esc = html.escape
    summary = summarize(log)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dcal doctor: {esc(log.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>dcal doctor: {esc(log.name)}</h1>", f"<pre>{esc(format_summary(summary))}</pre>", "<h2>Findings</h2>"]
    if findings:
        parts.append("<table><tr><th>severity</th><th>code</th><th>message</th><th>evidence</th></tr>")
        for f in findings:
            parts.append(f"<tr class='{esc(f.severity)}'><td>{esc(f.severity)}</td><td><code>{esc(f.code)}</code></td>"
                         f"<td>{esc(f.message)}</td><td><pre>{esc(json.dumps(f.evidence, indent=1))}</pre></td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No findings: nothing in this run looks wrong.</p>")
    parts.append("<h2>Plots</h2>")
    for title, png, note in _figures(log):
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(f'<img src="data:image/png;base64,{png}" alt="{esc(title)}"/>' if png
                     else f"<p><em>not drawn: {esc(note)}</em></p>")
    parts.append(_source_section(log))
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
