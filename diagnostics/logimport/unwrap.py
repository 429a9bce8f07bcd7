"""Undo a console's hard wrapping: PowerShell's ``2>&1`` capture (and some terminals' copy-paste) breaks every
line at a fixed width (~27-120 columns), so a traceback's ``ImportError: numpy.core.multiarray failed to
import`` arrives as three lines, and no line-based reader can see it.

A file is taken as hard-wrapped at width `W` (the longest line, leaving out `MAX_OVER_FRACTION` of the lines: a
console may print a few lines unwrapped) when at least `MIN_BAND_FRACTION`
of its non-empty lines are `BAND` or fewer characters short of `W`, and at least `MIN_SPACE_FRACTION` of those in the band end in a space (the mark of a word wrap: a table or
a fixed-width log has full lines, not trailing spaces). A physical line then continues the previous one when
the previous one is `W` long (broken mid-word) or ends in a space, unless it starts a line itself (indented,
``Traceback (``, ``SomethingError``). Each logical line
keeps the number of its first physical line, so line numbers in reports are the file's own.
"""
from __future__ import annotations

import re

__all__ = ["unwrap", "wrap_width"]

MIN_WIDTH = 16  # narrower than this, short lines are just short lines
MAX_WIDTH = 200  # wider, a common length is a table or a progress bar, not wrapping
BAND = 12  # a word wrap ends a line up to a word's length short of the width
MIN_BAND_FRACTION = 0.5
MAX_OVER_FRACTION = 0.01
MIN_SPACE_FRACTION = 0.2
MIN_LINES = 20
# A physical line that starts a logical one even after a full-width line: indented (a traceback frame or
# its source line), a traceback's head or an exception line.
_NEW_LINE = re.compile(r"^(?:\s|Traceback \(|(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b)")


def wrap_width(lines: list[str]) -> int | None:
    """The width `lines` are hard-wrapped at, or None when they are not."""
    nonempty = [ln for ln in lines if ln.strip()]
    if len(nonempty) < MIN_LINES:
        return None
    lengths = sorted((len(ln) for ln in nonempty), reverse=True)
    width = lengths[int(MAX_OVER_FRACTION * len(lengths))]  # all but that share of the lines fit in it
    if not MIN_WIDTH <= width <= MAX_WIDTH:
        return None
    band = [ln for ln in nonempty if width - BAND <= len(ln) <= width]
    over = sum(1 for ln in nonempty if len(ln) > width)
    spaced = sum(1 for ln in band if ln.endswith(" "))
    if (len(band) < MIN_BAND_FRACTION * len(nonempty) or over > MAX_OVER_FRACTION * len(nonempty)
            or spaced < MIN_SPACE_FRACTION * len(band)):
        return None
    return width


def unwrap(lines: list[str]) -> tuple[list[tuple[int, str]], int | None]:
    """(logical lines as (first physical line number, text), the width) — the lines unchanged (numbered)
    when they are not hard-wrapped."""
    width = wrap_width(lines)
    if width is None:
        return list(enumerate(lines, start=1)), None
    out: list[tuple[int, str]] = []
    joining = False
    for i, ln in enumerate(lines, start=1):
        if joining and out and not _NEW_LINE.match(ln):
            out[-1] = (out[-1][0], out[-1][1] + ln)
        else:
            out.append((i, ln))
        joining = len(ln) == width or (len(ln) <= width and ln.endswith(" ") and bool(ln.strip()))
    return out, width
