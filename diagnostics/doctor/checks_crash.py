"""How the run ended: an exception (`crash`) or a CUDA out-of-memory error (`oom`), with the allocator's
numbers and, when the model's shape is known, which attention map the failed request matches."""
from __future__ import annotations

import math

from ..logimport import exception_kind, parse_oom
from ..logimport.crash import UNITS, oom_device
from ..runlog import RunLog
from .common import ModelShape
from .findings import Finding
from .rules import OOM_EDGE_FRACTION

__all__ = ["check_crash", "check_oom", "match_attention_maps", "allocation_size", "OOM_ROUNDING_BYTES",
           "OOM_EDGE_FRACTION"]

# PyTorch's CUDA caching allocator reports the segment it tried to allocate, not the tensor's bytes: a
# request is rounded up to 512 bytes, then a request of at most 1 MiB takes a 2 MiB segment, one under
# 10 MiB a 20 MiB segment, a larger one a multiple of 2 MiB (c10/cuda/CUDACachingAllocator.cpp). Below
# 10 MiB many tensors share a segment size: no tensor is named from it.
ALLOC_ROUND, SMALL_SIZE, SMALL_BUFFER = 512, 2**20, 2 * 2**20
MIN_LARGE_ALLOC, LARGE_BUFFER, ROUND_LARGE = 10 * 2**20, 20 * 2**20, 2 * 2**20
OOM_ROUNDING_BYTES = ROUND_LARGE
_COMPONENT = {"sa": "SA score map", "glca": "GLCA score map", "pwca": "PWCA score map over 2N keys",
              "rollout_maps": "head-mean attention map kept for the rollout",
              "predecessor_sa_image2": "score map of a second SA pass for image 2",
              "predecessor_rollout_products": "rollout matrix product"}
_DTYPE = {4: "fp32", 2: "fp16/bf16"}


def _where(log: RunLog) -> str:
    end = log.end
    parts = []
    if end.epoch is not None:
        parts.append(f"epoch {end.epoch}")
    if end.step is not None:
        parts.append(f"step {end.step}")
    prog = end.context.get("progress")
    if prog:
        parts.append(f"batch {prog[0]}/{prog[1]}")
    text = ", ".join(parts) or "the end of the log"
    if end.context.get("after_eval"):
        text += " (the first step after an evaluation)" if prog and prog[0] == 0 else " (after an evaluation)"
    return text


def _code_where(log: RunLog) -> str:
    exc, ctx = log.end.exception, log.end.context
    where = ctx.get("user_where") or exc.get("where")
    line = f" (log line {log.end.line})" if log.end.line else ""
    return (f", raised in {where}" if where else "") + line


def check_crash(log: RunLog, C) -> Finding | None:
    end = log.end
    if end is None or end.status != "crashed":
        return None
    exc = end.exception
    kind = exception_kind(exc["type"], exc["message"])
    if kind == "oom":
        return None
    what = "a non-finite value" if kind == "nonfinite" else "an exception"
    message = exc["message"].splitlines()[0][:300] if exc["message"] else ""
    return Finding("crash", "error",
                   f"the run ended with {what} at {_where(log)}: {exc['type']}: {message}{_code_where(log)}",
                   {"type": exc["type"], "message": exc["message"], "where": exc.get("where"), "kind": kind,
                    "epoch": end.epoch, "step": end.step, "line": end.line,
                    "user_where": end.context.get("user_where"), "progress": end.context.get("progress")})


def _per_map_bytes(shape: ModelShape) -> list[dict]:
    """Bytes of one layer's map of each component, fp32 and fp16, from `diagnostics.memory.attention_memory`."""
    from ..memory import attention_memory
    from ..memory.sources import MB  # the unit of the estimate's ``mb`` column

    out = []
    for dtype_bytes in (4, 2):
        table = attention_memory(shape.backbone, shape.img_size, shape.batch_size, dtype_bytes=dtype_bytes)
        dims = table.attrs
        for comp, row in table.iterrows():
            if comp not in _COMPONENT or not row["layers"]:
                continue
            nbytes = float(row["mb"]) * MB / float(row["layers"])
            fp = "fp32" if "fp32" in str(row["map"]) else _DTYPE[dtype_bytes]
            out.append({"component": comp, "dtype": fp, "bytes": nbytes, "map": str(row["map"]),
                        "dims": {k: dims[k] for k in ("B", "H", "N", "k") if k in dims}})
    unique = {(o["component"], o["dtype"]): o for o in out}
    return list(unique.values())


def _map_numbers(entry: dict) -> str:
    """"B·H·N·2N" with the numbers: 4×12×785×1570."""
    d = entry["dims"]
    factors = {"B": d["B"], "H": d.get("H"), "N": d["N"], "2N": 2 * d["N"], "(1+k)": 1 + d.get("k", 0)}
    shape = entry["map"].split(" ")[0]
    try:
        return "×".join(str(factors[t]) for t in shape.split("·"))
    except KeyError:
        return shape


def allocation_size(nbytes: float) -> int:
    """The segment the caching allocator asks CUDA for to hold a tensor of `nbytes` (see the constants)."""
    size = math.ceil(nbytes / ALLOC_ROUND) * ALLOC_ROUND
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return math.ceil(size / ROUND_LARGE) * ROUND_LARGE


def match_attention_maps(requested: float, shape: ModelShape, precision: float = 0.005 * 2**20) -> list[dict]:
    """The attention maps (component, dtype) whose one-layer size, rounded as the allocator rounds it, is a
    failed request of `requested` bytes (within `precision`: the message prints two decimals). Requests
    under 10 MiB name nothing (many sizes share one segment)."""
    if requested < MIN_LARGE_ALLOC:
        return []
    return [e for e in _per_map_bytes(shape) if e["bytes"] >= MIN_LARGE_ALLOC
            and abs(allocation_size(e["bytes"]) - requested) <= precision]


def _mib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def _match_text(oom: dict, shape: ModelShape | None) -> tuple[str, list]:
    if "requested" not in oom:
        return "", []
    if shape is None:
        return (" The model's shape is unknown: pass --backbone, --img-size and --batch-size (or diagnose a run "
                "folder with its config) to compare the request with the attention-memory estimate."), []
    unit = oom["text"]["requested"].split()[-1].upper()
    matches = match_attention_maps(oom["requested"], shape, precision=0.005 * UNITS[unit])
    model = f"{shape.backbone} at {shape.img_size} px, batch {shape.batch_size} ({shape.source})"
    if not matches:
        return (f" The request is the size of no single attention map of {model} (as the allocator rounds "
                "it).", [])
    texts = [f"one {m['dtype']} {_COMPONENT[m['component']]} ({m['map'].split(' ')[0]} = {_map_numbers(m)} × "
             f"{4 if m['dtype'] == 'fp32' else 2} bytes = {_mib(m['bytes'])})" for m in matches]
    return (f" The {oom['text']['requested']} request is the size of " + " or ".join(texts) + f" of {model}, rounded up "
            f"to the allocator's {ROUND_LARGE // 2**20} MiB multiple."), matches


def _reading(oom: dict) -> str:
    notes = []
    total, alloc = oom.get("total"), oom.get("allocated")
    if total and alloc and alloc >= OOM_EDGE_FRACTION * total:
        notes.append(f"{alloc / total:.0%} of the GPU was allocated to live tensors when the request came: "
                     "the step itself is at the edge of the memory")
    free_cache, req = oom.get("reserved_unallocated"), oom.get("requested")
    if free_cache and req and free_cache >= req:
        notes.append(f"the cache held {_mib(free_cache)} reserved but unallocated, {free_cache / req:.1f}× the "
                     "request, in no block large enough (fragmentation; PYTORCH_CUDA_ALLOC_CONF="
                     "expandable_segments:True addresses it, empty_cache() does not: the allocator already "
                     "releases its cache before it raises)")
    text = "; ".join(notes)
    return f" {text[:1].upper()}{text[1:]}." if notes else ""


def check_oom(log: RunLog, C, shape: ModelShape | None = None) -> Finding | None:
    end = log.end
    if end is None or end.status != "crashed":
        return None
    exc = end.exception
    if exception_kind(exc["type"], exc["message"]) != "oom":
        return None
    oom = parse_oom(exc["message"])
    t = oom["text"]
    numbers = [f"tried to allocate {t['requested']}" if "requested" in t else "an allocation failed"]
    if "total" in t:
        numbers.append(f"on a {t['total']} GPU" + (f" ({t['free']} free)" if "free" in t else ""))
    if "allocated" in t:
        numbers.append(f"{t['allocated']} allocated by PyTorch")
    if "reserved_unallocated" in t:
        numbers.append(f"{t['reserved_unallocated']} reserved by PyTorch but unallocated")
    after = ("; it came right after an evaluation: an evaluation changes what the allocator holds (other batch "
             "sizes, tensors left alive into the next training forward), so the first training step after it can "
             "peak higher and find the cache fragmented; predict_step_memory(..., eval_inputs=...) predicts that "
             "step" if end.context.get("after_eval") else "")
    match, matches = _match_text(oom, shape)
    return Finding("oom", "error",
                   f"{oom_device(exc['type'], exc['message'])} out of memory at {_where(log)}{_code_where(log)}: "
                   + ", ".join(numbers) + "."
                   + _reading(oom) + match + after.replace("; it", " It", 1) + ("." if after else ""),
                   {"type": exc["type"], "epoch": end.epoch, "step": end.step, "line": end.line,
                    "progress": end.context.get("progress"), "after_eval": end.context.get("after_eval"),
                    "where": exc.get("where"), "user_where": end.context.get("user_where"),
                    "allocator_bytes": {k: v for k, v in oom.items() if k not in ("text", "device")},
                    "allocator_text": t, "device": oom.get("device"),
                    "model": None if shape is None else vars(shape), "matches": matches})
