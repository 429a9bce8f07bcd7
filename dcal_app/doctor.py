"""``dcal doctor PATH [--format F] [--num-classes C] [--map CANONICAL=NAME ...] [--steps-per-epoch N]
[--backbone B --img-size N --batch-size N] [--json] [--html FILE]``.

Exit status (`EXIT_CODES`): 0 no error finding; 1 an error finding; 2 nothing readable (no such path, no
metric, a malformed file, a bad argument); 3 an internal failure (a reader or a check failed: one line names
the file and the reader or check, never a traceback).

With ``--json`` every exit prints one JSON document on stdout: on 0 and 1 the findings, a list of
``{"code", "severity", "message", "evidence"}`` (unchanged); on 2 and 3 an object
``{"exit": 2|3, "error": "unreadable"|"internal", "path": ..., "reason": ..., "format": ..., "reader": ...}``
(``format``/``reader`` when known).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from diagnostics.doctor.checks import diagnose_log
from diagnostics.doctor.common import ModelShape
from diagnostics.doctor.reading import read_log
from diagnostics.doctor.report_text import format_text, summarize, to_json
from diagnostics.logimport import CANONICAL_NAMES, FORMATS, LogImportError, LogReaderFailure
from diagnostics.runlog import METRICS_FILE, RunLogError

__all__ = ["main", "parser", "EXIT_CODES", "EXIT_CLEAN", "EXIT_ERRORS", "EXIT_UNREADABLE", "EXIT_INTERNAL"]

EXIT_CLEAN, EXIT_ERRORS, EXIT_UNREADABLE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_CODES = {EXIT_CLEAN: "no error finding", EXIT_ERRORS: "an error finding",
              EXIT_UNREADABLE: "nothing readable: no such path, no metric, a malformed file or a bad argument",
              EXIT_INTERNAL: "internal failure: a reader or a check failed (one line names the file and which)"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcal doctor", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find out why a training run went wrong, from its run folder or any training log: Hugging Face "
        "trainer_state.json, Lightning metrics.csv, timm summary.csv, DeiT log.txt, OpenMMLab logs and "
        "scalars.json, Keras CSV and fit output, notebook output, TensorBoard, or any text, CSV or JSON-lines log.",
        epilog="exit status:\n" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items()))
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
    p.add_argument("--json", action="store_true", help="print the findings as JSON (a list of objects; on exit 2 "
                   "or 3 an object with the reason)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report to FILE")
    return p


def _shape(args, p: argparse.ArgumentParser) -> ModelShape | None:
    given = [args.backbone, args.img_size, args.batch_size]
    if not any(v is not None for v in given):
        return None
    if any(v is None for v in given):
        p.error("--backbone, --img-size and --batch-size go together (the attention-memory estimate needs all three)")
    return ModelShape(args.backbone, args.img_size, args.batch_size, "the command line")


def _fail(code: int, path, reason: str, as_json: bool, **known) -> int:
    """Print the failure (one line on stderr; with --json also the JSON object on stdout) and return `code`."""
    print(f"dcal doctor: {reason}", file=sys.stderr)
    if as_json:
        doc = {"exit": code, "error": "unreadable" if code == EXIT_UNREADABLE else "internal",
               "path": str(path), "reason": reason, **{k: v for k, v in known.items() if v is not None}}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    return code


def _where(e: BaseException) -> str:
    """The innermost frame of an exception: ``module.py:123 in function``."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "?"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def main(argv: Sequence[str] | None = None) -> int:
    """``dcal doctor PATH ...``: the exit status of `EXIT_CODES`."""
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        args = p.parse_args(argv)
        shape = _shape(args, p)
    except SystemExit as e:  # argparse exits on --help (0) and on bad arguments (2); hand back its status
        code = int(e.code or 0)
        if code and as_json:
            print(json.dumps({"exit": EXIT_UNREADABLE, "error": "unreadable", "path": None,
                              "reason": "bad arguments (see the usage line on stderr)"}, indent=2))
        return EXIT_UNREADABLE if code else EXIT_CLEAN
    path = Path(args.run_dir)
    if not path.exists():
        return _fail(EXIT_UNREADABLE, path, f"{path} does not exist", args.json)
    try:
        log = read_log(path, format=args.format, num_classes=args.num_classes, mapping=args.map,
                       steps_per_epoch=args.steps_per_epoch)
    except LogReaderFailure as e:
        return _fail(EXIT_INTERNAL, path, f"{e} (at {_where(e.error)})", args.json, format=e.format,
                     reader=e.reader)
    except (FileNotFoundError, RunLogError, LogImportError, OSError) as e:
        reason = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
        return _fail(EXIT_UNREADABLE, path, f"cannot read {reason}", args.json)
    fmt = log.source.format if log.source else "run"
    try:
        findings = diagnose_log(log, model=shape)
        out = to_json(findings) if args.json else format_text(findings, summarize(log))
    except Exception as e:  # a fault in a check, not in the log: one line, exit 3
        return _fail(EXIT_INTERNAL, path, f"{path}: internal failure of the checks (log read as {fmt}): "
                     f"{type(e).__name__}: {e} (at {_where(e)})", args.json, format=fmt, reader="checks")
    try:
        print(out, flush=True)
    except BrokenPipeError:  # `dcal doctor LOG | head`: the reader left; not a failure of the doctor
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit; give it somewhere to go
    if args.html:
        from diagnostics.doctor.report_html import write_html  # matplotlib: only when a report is asked for

        try:
            written = write_html(log, findings, args.html)
        except OSError as e:
            print(f"dcal doctor: cannot write the HTML report: {e}", file=sys.stderr)
            return EXIT_UNREADABLE
        print(f"dcal doctor: wrote {written}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_ERRORS if any(f.severity == "error" for f in findings) else EXIT_CLEAN
