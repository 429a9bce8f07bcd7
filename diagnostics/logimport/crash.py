"""How a run ended, read from text: Python tracebacks, bare exception lines, and the numbers of a CUDA
out-of-memory message (both of PyTorch's wordings: "Tried to allocate 226.00 MiB. GPU 0 has a total
capacity of 15.89 GiB of which 225.12 MiB is free. ... 14.12 GiB is allocated by PyTorch, and 1.25 GiB is
reserved by PyTorch but unallocated" and the older "(GPU 0; 15.78 GiB total capacity; 14.01 GiB already
allocated; 19.69 MiB free; 14.29 GiB reserved in total by PyTorch)").

Tracebacks are read in Python's shape (``Traceback (most recent call last):``, ``  File "x.py", line 3, in f``)
and IPython's (a rule of dashes, ``RuntimeError    Traceback (most recent call last)``, ``Cell In[16], line 3``,
``File /path/x.py:347, in f(...)``, numbered source lines with ``-->``), with ANSI colours already removed.
Out of memory, in every wording PyTorch and its allocators use (`OOM_MARKERS`): the caching allocator's
"CUDA out of memory. Tried to allocate ...", cudaMalloc's "CUDA error: out of memory", ``OutOfMemoryError``,
cuDNN/cuBLAS allocation failures, MPS ("MPS backend out of memory") and the CPU allocator
("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Traceback", "TracebackReader", "parse_oom", "oom_device", "exception_kind", "EXCEPTION_LINE", "UNITS",
           "OOM_MARKERS"]

UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = r"([\d.]+)\s*([KMGT]i?B|B)\b"
# Each allocator number: its key and the wordings PyTorch has used for it.
_OOM_FIELDS = {
    "requested": (rf"Tried to allocate {_SIZE}",),
    "total": (rf"total capacity of {_SIZE}", rf"{_SIZE} total capacity"),
    "free": (rf"of which {_SIZE} is free", rf"{_SIZE} free"),
    "allocated": (rf"{_SIZE} is allocated by PyTorch", rf"{_SIZE} already allocated"),
    "reserved_unallocated": (rf"{_SIZE} is reserved by PyTorch but unallocated",),
    "reserved": (rf"{_SIZE} reserved in total by PyTorch",),
    "process_in_use": (rf"has {_SIZE} memory in use",),
}
OOM_MARKERS = re.compile(
    r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_(?:NOT_ENOUGH_WORKSPACE|ALLOC_FAILED)"
    r"|DefaultCPUAllocator: (?:can't|not enough)|can't allocate memory|not enough memory"
    r"|MemoryError|std::bad_alloc|Cannot allocate memory", re.I)
_NONFINITE = re.compile(r"\b(?:nan|inf|infinity|non-?finite|not finite)\b", re.I)
# "torch.OutOfMemoryError: CUDA out of memory. ..." / "ValueError: ..." / "KeyboardInterrupt"
EXCEPTION_LINE = re.compile(
    r"^(?P<type>(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure|Warning))(?::\s?(?P<msg>.*))?$")
_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<func>.+))?$')
# IPython: "File /path/x.py:347, in backward(tensors, ...)" and "Cell In[16], line 3" (or "Input In [4], in <cell line: 2>()")
_IPY_FRAME = re.compile(r"^\s*File (?P<file>.+?):(?P<line>\d+), in (?P<func>[^(]+)")
_IPY_CELL = re.compile(r"^\s*(?:Cell In ?\[(?P<cell>\d*)\], line (?P<line>\d+)|Input In \[(?P<cell2>\d*)\])")
_IPY_HEAD = re.compile(r"^(?P<type>(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\s+Traceback \(most recent call last\)")
_IPY_SOURCE = re.compile(r"^\s*(?:-+>\s*)?\d+\s")  # "    580     )", "--> 581 torch.autograd.backward("
_EXCEPTION_HEAD = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?::\s|:$|$)")  # "KeyError: 'x'", "KeyboardInterrupt"
_LIBRARY = re.compile(r"[/\\](?:site-packages|dist-packages|lib[/\\]python\d[\d.]*)[/\\]")
# A traceback's message may continue over a few lines (torch's OOM message does not, some do).
MAX_MESSAGE_LINES = 20


@dataclass
class Traceback:
    """A traceback read from a log: where it starts (1-based line), its frames, the exception's type and
    message, and the line of the exception."""

    start: int
    frames: list[dict] = field(default_factory=list)
    type: str | None = None
    message: str = ""
    line: int | None = None

    @property
    def where(self) -> str | None:
        """The last frame (where the exception was raised): ``file:line in func``."""
        return _frame_text(self.frames[-1]) if self.frames else None

    @property
    def user_where(self) -> str | None:
        """The last frame outside installed libraries (the user's own code), with its source line."""
        mine = [f for f in self.frames if not _LIBRARY.search(f["file"])]
        if not mine:
            return None
        f = mine[-1]
        return _frame_text(f) + (f": {f['code']}" if f.get("code") else "")

    def as_exception(self) -> dict:
        return {"type": self.type, "message": self.message, "where": self.where}


def _frame_text(f: dict) -> str:
    return f"{f['file']}:{f['line']}" + (f" in {f['func']}" if f.get("func") else "")


class TracebackReader:
    """Feed lines one by one (`feed` returns True while the line belongs to a traceback); `tracebacks`
    holds every complete one. Chained tracebacks ("During handling of the above exception ...") are read
    as separate tracebacks; the last one is what ended the run."""

    def __init__(self):
        self.tracebacks: list[Traceback] = []
        self._tb: Traceback | None = None
        self._in_message = False
        self._ipython = False

    def feed(self, lineno: int, raw: str, stripped: str) -> bool:
        """Args: lineno (1-based), raw (the line as written), stripped (with its log prefix removed)."""
        if stripped.startswith("Traceback (most recent call last)"):
            self._close()
            self._tb = Traceback(start=lineno)
            return True
        head = _IPY_HEAD.match(stripped)
        if head:  # IPython: "RuntimeError      Traceback (most recent call last)"
            self._close()
            self._tb = Traceback(start=lineno)
            self._ipython = True
            return True
        tb = self._tb
        if tb is None:
            return False
        if self._ipython and not self._in_message:
            if not raw.strip() or set(raw.strip()) <= set("-"):
                return True  # IPython separates its frames by blank lines
            m = _IPY_FRAME.match(raw) or _IPY_CELL.match(raw)
            if m:
                d = m.groupdict()
                file = d.get("file") or f"Cell In[{d.get('cell') or d.get('cell2') or ''}]"
                tb.frames.append({"file": file.strip(), "line": int(d["line"]) if d.get("line") else 0,
                                  "func": (d.get("func") or "").strip()})
                return True
            if _IPY_SOURCE.match(raw):
                code = re.sub(r"^\s*(?:-+>\s*)?\d+\s", "", raw).strip()
                if raw.lstrip().startswith("-") and tb.frames and code:
                    tb.frames[-1]["code"] = code  # the arrow marks the line that raised
                return True
        if self._in_message:
            if not raw.strip() or len(tb.message.splitlines()) >= MAX_MESSAGE_LINES:
                self._close()
                return False
            tb.message += "\n" + raw.strip()
            return True
        body = stripped.strip()
        m = _FRAME.match(raw) or _FRAME.match("  " + body)  # "[12:00:01]   File ...": a time-stamped line
        if m:
            tb.frames.append({"file": m["file"], "line": int(m["line"]), "func": (m["func"] or "").strip()})
            return True
        prefixed = raw.strip() != body  # a time stamp or level before the text: its indentation is lost
        if raw[:1].isspace() or (prefixed and tb.frames and body and not _EXCEPTION_HEAD.match(body)):
            # the source line under a frame, or a caret line
            code = raw.strip()
            if tb.frames and code and not set(code) <= set("^~ ") and "code" not in tb.frames[-1]:
                tb.frames[-1]["code"] = code
            return True
        m = EXCEPTION_LINE.match(stripped.strip()) or re.match(r"^(?P<type>[A-Za-z_][\w.]*):\s?(?P<msg>.*)$",
                                                               stripped.strip())
        if m:
            tb.type, tb.message, tb.line = m["type"], (m["msg"] or "").strip(), lineno
            self._in_message = True
            return True
        self._close()  # not a traceback line after all: the traceback was cut short
        return False

    def _close(self) -> None:
        if self._tb is not None and self._tb.type is not None:
            self.tracebacks.append(self._tb)
        self._tb, self._in_message, self._ipython = None, False, False

    def finish(self) -> list[Traceback]:
        self._close()
        return self.tracebacks


def exception_kind(type_name: str | None, message: str) -> str:
    """"oom" for an out-of-memory error, "nonfinite" for a NaN/Inf error, else "exception"."""
    text = f"{type_name or ''}: {message}"
    if OOM_MARKERS.search(text):
        return "oom"
    if "NonFinite" in (type_name or "") or _NONFINITE.search(message):
        return "nonfinite"
    return "exception"


_CPU_OOM = re.compile(r"DefaultCPUAllocator|can't allocate memory|not enough memory|(?<![A-Za-z])MemoryError|std::bad_alloc"
                      r"|Cannot allocate memory", re.I)


def oom_device(type_name: str | None, message: str) -> str:
    """Which memory ran out, as the message says: "MPS", "XPU", "CPU" (the host allocator, `MemoryError`),
    else "CUDA" (the caching allocator, cudaMalloc, cuBLAS/cuDNN workspaces)."""
    text = f"{type_name or ''}: {message}"
    if re.search(r"\bMPS\b", text):
        return "MPS"
    if re.search(r"\bXPU\b", text):
        return "XPU"
    if _CPU_OOM.search(text):
        return "CPU"
    return "CUDA"


def parse_oom(message: str) -> dict:
    """The allocator numbers of an out-of-memory message, in bytes (keys: requested, total, free,
    allocated, reserved_unallocated, reserved, process_in_use; each only when the message states it),
    plus ``text`` (each number as written, e.g. ``"226.00 MiB"``) and ``device`` when named."""
    out: dict = {"text": {}}
    for key, patterns in _OOM_FIELDS.items():
        for pattern in patterns:
            m = re.search(pattern, message)
            if m:
                out[key] = float(m.group(1)) * UNITS[m.group(2).upper()]
                out["text"][key] = f"{m.group(1)} {m.group(2)}"
                break
    if "reserved_unallocated" not in out and "reserved" in out and "allocated" in out:
        out["reserved_unallocated"] = out["reserved"] - out["allocated"]
        out["text"]["reserved_unallocated"] = f"{out['reserved_unallocated'] / 2**30:.2f} GiB (reserved − allocated)"
    m = re.search(r"GPU (\d+)", message)
    if m:
        out["device"] = f"GPU {m.group(1)}"
    return out
