"""Every check, in order, over one `RunLog`: `diagnose_log` (and `diagnose` for a path). Each check is a
small function of the log (and C) that returns a `Finding` or None; what could not be checked says so
(`check-skipped`), and how an imported log was read is a finding too (`log-import`)."""
from __future__ import annotations

from pathlib import Path

from ..runlog import RunLog
from ..stats import BRANCHES, has_values
from .checks_crash import check_crash, check_oom
from .checks_dynamics import check_loss_rising, check_uncertainty_lag, lag_skipped_reason
from .checks_learning import (
    ACCURACY_COLUMNS,
    check_chance,
    check_clamped,
    check_collapse,
    check_coupled_wd,
    check_lr_rule,
    check_uncertainty_at_chance,
)
from .checks_records import check_empty, check_memory, check_nonfinite, check_selection, check_truncated
from .checks_training import check_accuracy_regression, check_divergence, check_overfitting, check_unstable
from .common import ModelShape, data_losses
from .findings import SEVERITIES, Finding
from .reading import read_log

__all__ = ["diagnose", "diagnose_log", "import_finding", "skipped_checks", "model_shape"]

# How many recognised/unrecognised labels the log-import message lists (the evidence holds them all).
LIST_LIMIT = 12


def model_shape(model, config: dict | None) -> ModelShape | None:
    """A `ModelShape` from the user's (a ModelShape or a dict backbone/img_size/batch_size), else the config."""
    if model is None:
        return ModelShape.from_config(config)
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        missing = {"backbone", "img_size", "batch_size"} - set(model)
        if missing:
            raise ValueError(f"model needs backbone, img_size and batch_size; missing {sorted(missing)}")
        return ModelShape(str(model["backbone"]), int(model["img_size"]), int(model["batch_size"]),
                          str(model.get("source", "given")))
    raise TypeError(f"model must be a ModelShape or a dict, got {type(model).__name__}")


def _listing(items: dict, limit: int = LIST_LIMIT, fmt=lambda k, v: f"{k} → {v}") -> str:
    shown = [fmt(k, v) for k, v in list(items.items())[:limit]]
    return ", ".join(shown) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def import_finding(log: RunLog) -> Finding | None:
    """How an imported log was read: records, names, normalisations, what was left out or unreadable."""
    src = log.source
    if src is None:
        return None
    per = {"epoch": " (one per epoch)", "step": "", "record": " (no index: in order)"}[log.step_unit]
    parts = [f"read as a {src.format} log ({src.lines} {'events' if src.format == 'tensorboard' else 'lines'}): "
             f"{len(log.steps)} training records{per} and {len(log.evals)} evaluation records"]
    if src.recognised:
        parts.append("names: " + _listing(src.recognised))
    parts += src.notes
    if src.unrecognised:
        parts.append("not recognised (name them with --map CANONICAL=NAME): "
                     + _listing(src.unrecognised, fmt=lambda k, v: f"{k!r} (line {v})" if isinstance(v, int)
                                else f"{k!r} ({v})"))
    if src.problems:
        parts.append("could not be read: " + "; ".join(
            (f"line {ln}: {why}" if ln is not None else why) for ln, why in src.problems[:LIST_LIMIT]))
    if log.steps_per_epoch_source:
        parts.append(f"steps per epoch: {log.steps_per_epoch_source}")
    return Finding("log-import", "warning" if src.problems else "info", "; ".join(parts),
                   {"format": src.format, "path": str(src.path), "lines": src.lines, "step_unit": log.step_unit,
                    "records": {"steps": len(log.steps), "evals": len(log.evals)}, "recognised": src.recognised,
                    "unrecognised": src.unrecognised,
                    "problems": [{"line": ln, "why": why} for ln, why in src.problems], "notes": src.notes,
                    "settings": src.settings, "steps_per_epoch": log.steps_per_epoch,
                    "steps_per_epoch_source": log.steps_per_epoch_source})


# Labels of metrics that are not an accuracy: a log that has only these cannot be read for chance or collapse.
OTHER_METRIC_WORDS = ("f1", "auc", "precision", "recall", "map", "iou", "dice", "mcc", "kappa", "metric", "acc")


def _needs_classes(log: RunLog) -> bool:
    st, ev = log.steps, log.evals
    return (any(has_values(st, f"w_{b}") for b in BRANCHES) or bool(data_losses(st))
            or any(has_values(ev, c) for c in ACCURACY_COLUMNS) or has_values(st, "train_acc"))


def _no_accuracy(log: RunLog) -> Finding | None:
    """The accuracy checks cannot run: the log has evaluations (or metric labels) but no validation accuracy."""
    if any(has_values(log.evals, c) for c in ACCURACY_COLUMNS):
        return None
    src = log.source
    others = [k for k in (src.unrecognised if src is not None else {})
              if any(w in str(k).lower().replace("-", "_").split("_") or str(k).lower().endswith(w)
                     for w in OTHER_METRIC_WORDS)]
    if log.evals.empty and not others:
        return None
    said = (f"; the log has {', '.join(repr(k) for k in others[:LIST_LIMIT])}, not read as an accuracy (if one is "
            "the validation accuracy, pass --map val_acc=NAME)" if others else "")
    checks = ["chance-level (accuracy)", "accuracy-collapse", "accuracy-regression"]
    return Finding("check-skipped", "info",
                   f"{', '.join(checks[:-1])} and {checks[-1]} not checked: no validation accuracy was logged{said}",
                   {"checks": checks, "reason": "no validation accuracy", "other_metrics": others})


def skipped_checks(log: RunLog, C) -> list[Finding]:
    """The checks the log has data for but that could not run, each with why."""
    out = []
    if not C and _needs_classes(log):
        out.append(Finding(
            "check-skipped", "info",
            "chance-level, uncertainty-at-chance, divergence (a loss far above ln C) and unstable not checked: "
            "the number of classes C is unknown (no eval "
            "record holds num_classes, no config states it, the log does not); pass --num-classes C (Python: "
            "num_classes=C). Without it a run at chance can look healthy",
            {"checks": ["chance-level", "uncertainty-at-chance", "divergence", "unstable"],
             "reason": "num_classes unknown"}))
    if not (log.steps.empty and log.evals.empty) and (acc := _no_accuracy(log)) is not None:
        out.append(acc)
    reason = lag_skipped_reason(log)
    if reason:
        out.append(Finding("check-skipped", "info", f"uncertainty-lag not checked: {reason}",
                           {"checks": ["uncertainty-lag"], "reason": reason}))
    return out


def diagnose_log(log: RunLog, *, model=None) -> list[Finding]:
    """Every finding this `RunLog` supports, errors first.

    Args:
        log: the run (`load_run`, `import_log`).
        model: the model's shape for the OOM arithmetic (a `ModelShape` or a dict backbone, img_size,
            batch_size); default: from the run's config when it has one.
    """
    C = log.num_classes
    shape = model_shape(model, log.config)
    findings = [check_empty(log, C), check_truncated(log, C), import_finding(log)]
    if not (log.steps.empty and log.evals.empty):
        findings += [check(log, C) for check in (check_nonfinite, check_chance, check_divergence,
                                                  check_uncertainty_at_chance, check_uncertainty_lag, check_clamped,
                                                  check_collapse, check_accuracy_regression, check_loss_rising,
                                                  check_overfitting, check_unstable, check_memory, check_selection,
                                                  check_lr_rule)]
        seen = {f.code for f in findings if f is not None}
        findings.append(check_coupled_wd(log, C, "accuracy-collapse" in seen, "loss-rising" in seen))
    findings += [check_crash(log, C), check_oom(log, C, shape)]
    findings += skipped_checks(log, C)
    findings = [f for f in findings if f is not None]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def diagnose(run: str | Path | RunLog, *, format: str = "auto", num_classes: int | None = None, mapping=None,
             steps_per_epoch: float | None = None, model=None) -> list[Finding]:
    """Read a run folder or any training log (`diagnostics.import_log`) and return its findings.

    Args:
        run: a run folder, a log file or folder, or a `RunLog`.
        format, num_classes, mapping, steps_per_epoch: as `import_log` takes them.
        model: the model's shape for the OOM arithmetic (see `diagnose_log`).

    Raises `FileNotFoundError` for a missing path, `RunLogError` for a malformed run file and
    `LogImportError` for a log nothing can be read from.
    """
    log = read_log(run, format=format, num_classes=num_classes, mapping=mapping, steps_per_epoch=steps_per_epoch)
    return diagnose_log(log, model=model)
