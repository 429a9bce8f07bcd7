"""``dcal doctor PATH [--format F] [--num-classes C] [--map CANONICAL=NAME ...] [--steps-per-epoch N]
[--backbone B --img-size N --batch-size N] [--json] [--html FILE]``: exit 1 when a finding is an error,
0 otherwise, 2 when the input cannot be read."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from diagnostics.doctor.checks import diagnose_log
from diagnostics.doctor.common import ModelShape
from diagnostics.doctor.reading import read_log
from diagnostics.doctor.report_text import format_text, summarize, to_json
from diagnostics.logimport import CANONICAL_NAMES, FORMATS, LogImportError
from diagnostics.runlog import METRICS_FILE, RunLogError

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcal doctor", description="Find out why a training run went wrong, from "
                                "its run folder or any training log (text, CSV, JSON lines, TensorBoard).")
    p.add_argument("run_dir", metavar="PATH", help=f"a run folder (holding {METRICS_FILE}), or a log file or "
                   "folder of another format")
    p.add_argument("--format", choices=FORMATS, default="auto", help="how to read PATH (default: detected)")
    p.add_argument("--num-classes", type=int, metavar="C", help="the number of classes, for the chance checks")
    p.add_argument("--map", action="append", default=[], metavar="CANONICAL=NAME",
                   help="read the log's label NAME as CANONICAL (repeatable); canonical names: "
                   + ", ".join(CANONICAL_NAMES))
    p.add_argument("--steps-per-epoch", type=float, metavar="N",
                   help="optimiser steps per epoch, for a log with one record per epoch")
    p.add_argument("--backbone", help="timm backbone name (with --img-size and --batch-size: the OOM arithmetic)")
    p.add_argument("--img-size", type=int, metavar="N", help="input side in pixels")
    p.add_argument("--batch-size", type=int, metavar="N", help="micro-batch size (per GPU, per forward)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON (a list of objects)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report to FILE")
    return p


def _shape(args, p: argparse.ArgumentParser) -> ModelShape | None:
    given = [args.backbone, args.img_size, args.batch_size]
    if not any(v is not None for v in given):
        return None
    if any(v is None for v in given):
        p.error("--backbone, --img-size and --batch-size go together (the attention-memory estimate needs all three)")
    return ModelShape(args.backbone, args.img_size, args.batch_size, "the command line")


def main(argv: Sequence[str] | None = None) -> int:
    """``dcal doctor PATH ...``: 1 when a finding is an error, 0 otherwise, 2 when PATH cannot be read."""
    p = parser()
    try:
        args = p.parse_args(argv)
        shape = _shape(args, p)
    except SystemExit as e:  # argparse exits on --help and on bad arguments; hand back its status
        return int(e.code or 0)
    path = Path(args.run_dir)
    if not path.exists():
        print(f"dcal doctor: {path} does not exist", file=sys.stderr)
        return 2
    try:
        log = read_log(path, format=args.format, num_classes=args.num_classes, mapping=args.map,
                       steps_per_epoch=args.steps_per_epoch)
    except (FileNotFoundError, RunLogError, LogImportError, OSError) as e:
        print(f"dcal doctor: cannot read {path}: {e}", file=sys.stderr)
        return 2
    findings = diagnose_log(log, model=shape)
    print(to_json(findings) if args.json else format_text(findings, summarize(log)))
    if args.html:
        from diagnostics.doctor.report_html import write_html  # matplotlib: only when a report is asked for

        try:
            out = write_html(log, findings, args.html)
        except OSError as e:
            print(f"dcal doctor: cannot write the HTML report: {e}", file=sys.stderr)
            return 2
        print(f"dcal doctor: wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 1 if any(f.severity == "error" for f in findings) else 0
