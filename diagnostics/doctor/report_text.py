"""The doctor's findings as text and JSON, and the run summary they open with."""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from ..curves import uncertainty_reading
from ..logimport import CANONICAL_NAMES, FORMAT_NAMES
from ..runlog import RunLog
from ..stats import BRANCHES, finite, has_values
from .checks_learning import ACCURACY_COLUMNS
from .common import LABEL, acc_label
from .findings import SEVERITIES, Finding, jsonable

__all__ = ["summarize", "format_summary", "format_text", "to_json"]


def _end(log: RunLog) -> dict | None:
    end = log.end
    if end is None:
        return None
    exc = end.exception or {}
    return {"status": end.status, "epoch": end.epoch, "step": end.step, "exception_type": exc.get("type"),
            "line": end.line}


def summarize(log: RunLog) -> dict:
    """Steps, evals, final and best accuracies, final branch losses, uncertainty reading, how it ended."""
    st, ev = log.steps, log.evals
    out: dict = {"run": str(log.path), "config": log.config is not None, "num_classes": log.num_classes,
                 "format": log.source.format if log.source else "run", "step_unit": log.step_unit,
                 "steps_logged": len(st), "evals_logged": len(ev)}
    if "step" in st.columns and len(st):
        out["last_step"] = int(st["step"].max())
    if "epoch" in st.columns and len(st):
        out["last_epoch"] = int(finite(st["epoch"]).max()) if has_values(st, "epoch") else None
    out["final_accuracy"], out["best_accuracy"] = {}, {}
    for col in ACCURACY_COLUMNS:
        if has_values(ev, col):
            s = ev.loc[np.isfinite(ev[col])]
            i = int(np.argmax(s[col].to_numpy()))
            out["final_accuracy"][col] = float(s[col].iloc[-1])
            out["best_accuracy"][col] = {"value": float(s[col].iloc[i]),
                                         "step": int(s["step"].iloc[i]) if "step" in s else None}
    out["final_loss"] = {b: float(finite(st[f"loss_{b}"]).iloc[-max(1, len(st) // 10):].mean())
                         for b in BRANCHES if has_values(st, f"loss_{b}")}
    out["uncertainty"] = uncertainty_reading(st, log.num_classes) if len(st) else None
    out["end"] = _end(log)
    if log.source is not None:  # an imported log: the format recognised and what it became
        out["format_name"] = FORMAT_NAMES.get(log.source.format, log.source.format)
        out["read"] = {"training": [c for c in CANONICAL_NAMES if has_values(st, c)],
                       "validation": [c for c in CANONICAL_NAMES if has_values(ev, c)]}
        out["planned"] = {k: log.source.settings[k] for k in ("planned_epochs", "planned_steps")
                          if k in log.source.settings}
    return jsonable(out)


def format_summary(summary: dict) -> str:
    fmt = summary.get("format", "run")
    head = f"run: {summary['run']}"
    if fmt == "run":
        head += "" if summary.get("config") else "  (no config.yaml)"
    else:
        head += f"  ({fmt}: {summary.get('format_name', fmt)})"
    unit = summary.get("step_unit", "step")
    n = f"{summary['steps_logged']} {'step' if unit == 'step' else 'training'} records"
    if "last_step" in summary:
        last = (f"last step {summary['last_step']}" if unit == "step" else f"last {unit} {summary['last_step']}")
        n += f" ({last}" + (f", epoch {summary['last_epoch']}" if summary.get("last_epoch") is not None and
                            unit == "step" else "") + ")"
    n += f", {summary['evals_logged']} evals" + (f", C = {summary['num_classes']}" if summary["num_classes"] else "")
    lines = [head, "  " + n]
    read = summary.get("read")
    if read is not None:
        parts = [f"{', '.join(v)} ({k})" for k, v in read.items() if v]
        planned = ", ".join(f"{v} {k.split('_')[1]}" for k, v in (summary.get("planned") or {}).items())
        lines.append("  read: " + ("; ".join(parts) or "no metric") + (f"; the log plans {planned}" if planned else ""))
    if summary["final_accuracy"]:
        acc = ", ".join(f"{acc_label(k)} {v:.2%}" for k, v in summary["final_accuracy"].items())
        best = ", ".join(f"{acc_label(k)} {v['value']:.2%} ({unit} {v['step']})"
                         for k, v in summary["best_accuracy"].items())
        lines += [f"  final accuracy: {acc}", f"  best accuracy:  {best}"]
    if summary["final_loss"]:
        lines.append("  final losses: " + ", ".join(f"{LABEL[b]} {v:.3f}" for b, v in summary["final_loss"].items()))
    if summary.get("uncertainty"):
        lines.append(f"  uncertainty: {summary['uncertainty']}")
    end = summary.get("end")
    if end:
        where = ", ".join(f"{k} {end[k]}" for k in ("epoch", "step") if end.get(k) is not None)
        lines.append(f"  ended: {end['status']}" + (f" at {where}" if where else "")
                     + (f" ({end['exception_type']})" if end.get("exception_type") else ""))
    return "\n".join(lines)


def format_text(findings: Sequence[Finding], summary: dict | None = None) -> str:
    """Findings as text, one per paragraph, with a count line (and the summary first, when given)."""
    lines = [format_summary(summary), ""] if summary else []
    if not findings:
        lines.append("no findings: nothing in this run looks wrong")
        return "\n".join(lines)
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    lines.append("findings: " + ", ".join(f"{c} {s}{'s' if c != 1 else ''}" for s, c in counts.items() if c))
    for f in findings:
        lines.append(f"  [{f.severity}] {f.code}: {f.message}")
    return "\n".join(lines)


def to_json(findings: Sequence[Finding], indent: int | None = 2) -> str:
    """JSON text: a list of ``{"code", "severity", "message", "evidence"}``."""
    return json.dumps([f.to_dict() for f in findings], indent=indent, ensure_ascii=False, allow_nan=False)
