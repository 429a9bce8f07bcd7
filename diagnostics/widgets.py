"""Notebook widgets over the diagnostics: each builds its figures with the pure plotting helpers and
renders them to PNG in an `Output` widget's outputs directly, so they work (and are tested) without a
browser or a kernel."""
from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from .curves import DEFAULT_ACCURACIES, DEFAULT_LOSSES, plot_curves, plot_uncertainty
from .extras import require
from .figures import png_bytes
from .runlog import METRICS_FILE, RunLog, RunLogError, load_run

widgets = require("ipywidgets", "the run explorer (diagnostics.run_explorer)")

__all__ = ["RunExplorer", "run_explorer"]

MAX_DEFAULT_METRICS = 4  # more curves than this in one default view are hard to read


# --- run explorer

def _sources(runs) -> dict[str, Path | RunLog]:
    """What the explorer shows, by dropdown value: run folders found by `_find_runs`, or `RunLog`s (from
    `diagnostics.import_log`: any training log) keyed by their path; a list may mix both."""
    if isinstance(runs, RunLog):
        runs = [runs]
    if isinstance(runs, (str, Path)):
        return {str(p): p for p in _find_runs(runs)}
    runs = list(runs)
    folders = _find_runs([r for r in runs if not isinstance(r, RunLog)]) if any(
        not isinstance(r, RunLog) for r in runs) else []
    out = {str(p): p for p in folders}
    out.update({str(r.path): r for r in runs if isinstance(r, RunLog)})
    if not out:
        raise ValueError("run_explorer: no runs given")
    if len(out) < len(runs):
        raise ValueError("run_explorer: two runs share a path; give each run once")
    return out


def _find_runs(runs_root_or_dirs) -> list[Path]:
    """Run folders: the folder itself if it holds metrics.jsonl, else its sub-folders (two levels) that do;
    or the given folders."""
    if isinstance(runs_root_or_dirs, (str, Path)):
        root = Path(runs_root_or_dirs)
        if not root.is_dir():
            raise FileNotFoundError(f"run_explorer: {root} is not a folder")
        if (root / METRICS_FILE).is_file():
            return [root]
        runs = sorted({p.parent for pattern in (f"*/{METRICS_FILE}", f"*/*/{METRICS_FILE}") for p in root.glob(pattern)})
        if not runs:
            raise FileNotFoundError(f"run_explorer: no run folder (holding {METRICS_FILE}) under {root}")
        return runs
    runs = [Path(p) for p in runs_root_or_dirs]
    if not runs:
        raise ValueError("run_explorer: no run folders given")
    missing = [str(p) for p in runs if not (p / METRICS_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"run_explorer: no {METRICS_FILE} in {missing}")
    return runs


def _metric_options(log: RunLog) -> list[str]:
    """Numeric step columns by name, then eval columns (``eval/NAME`` where a step column has that name)."""
    skip = {"step", "epoch", "time", "num_classes", "num_images"}
    step_cols = [c for c in log.steps.columns if c not in skip and log.steps[c].dtype.kind == "f"
                 and log.steps[c].notna().any()]
    eval_cols = [c for c in log.evals.columns if c not in skip and log.evals[c].dtype.kind == "f"
                 and log.evals[c].notna().any()]
    return step_cols + [f"eval/{c}" if c in step_cols else c for c in eval_cols]


class RunExplorer:
    """A dropdown of runs, a view toggle (curves or uncertainty weights) and a multi-select of metrics
    over an `Output`; `update()` redraws and returns the Figure (also kept as ``figure``, with ``png``)."""

    def __init__(self, runs: str | Path | RunLog | Sequence[str | Path | RunLog]):
        self.sources = _sources(runs)
        self.runs = [Path(k) for k in self.sources]
        unique = len({p.name for p in self.runs}) == len(self.runs)
        labels = [(p.name if unique else str(p), str(p)) for p in self.runs]
        self.run = widgets.Dropdown(options=labels, value=str(self.runs[0]), description="run")
        self.view = widgets.ToggleButtons(options=["curves", "uncertainty"], value="curves", description="view")
        self.metrics = widgets.SelectMultiple(options=[], description="metrics", rows=8)
        self.note = widgets.HTML()
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.run, self.view]), self.metrics, self.note, self.output])
        self.widget.explorer = self
        self.widget.redraw = self.update
        self.log: RunLog | None = None
        self.figure: Figure | None = None
        self.png = b""
        self._loading = False
        self._load()
        self.run.observe(lambda _change: (self._load(), self.update()), names="value")
        for w in (self.view, self.metrics):
            w.observe(lambda _change: None if self._loading else self.update(), names="value")
        self.update()

    def _load(self) -> None:
        source = self.sources[self.run.value]
        try:
            self.log = source if isinstance(source, RunLog) else load_run(source)
        except (FileNotFoundError, RunLogError) as e:
            self.log = None
            self.note.value = f"<b>cannot read this run:</b> {e}"
            return
        options = _metric_options(self.log)
        keep = [m for m in self.metrics.value if m in options]
        # DCAL's branch losses and accuracies when the run has them; a log from another trainer: its own
        # first columns (MAX_DEFAULT_METRICS), so that something is drawn before the user picks
        default = [m for m in DEFAULT_LOSSES + DEFAULT_ACCURACIES if m in options] or options[:MAX_DEFAULT_METRICS]
        self._loading = True  # setting options resets the value: redraw once, after both are set
        try:
            self.metrics.options = options
            self.metrics.value = tuple(keep or default)
        finally:
            self._loading = False
        self.note.value = "<br>".join(f"⚠ {w}" for w in self.log.warnings)

    def _show(self, data: dict) -> None:
        self.output.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)

    def update(self) -> Figure | None:
        """Redraw for the current run, view and metrics; a run or selection that cannot be drawn shows why."""
        if self.log is None:
            self.figure, self.png = None, b""
            self._show({"text/plain": "no run loaded"})
            return None
        try:
            if self.view.value == "uncertainty":
                fig = plot_uncertainty(self.log)
            else:
                fig = plot_curves(self.log, metrics=list(self.metrics.value) or None)
        except (ValueError, TypeError) as e:
            self.figure, self.png = None, b""
            self._show({"text/plain": f"cannot draw {self.view.value} for {self.log.name}: {e}"})
            return None
        self.figure, self.png = fig, png_bytes(fig)
        self._show({"image/png": base64.b64encode(self.png).decode("ascii"),  # the PNG rendered once, above
                    "text/plain": f"{self.view.value}: {self.log.name}"})
        return fig


def run_explorer(runs: str | Path | RunLog | Sequence[str | Path | RunLog]) -> widgets.VBox:
    """A run explorer widget (a VBox; its `RunExplorer` is ``.explorer``) over a folder of runs, a single
    run folder, a list of run folders, or `RunLog`s imported from any training log (`diagnostics.import_log`)."""
    return RunExplorer(runs).widget
