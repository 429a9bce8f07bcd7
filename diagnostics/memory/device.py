"""What the card must hold for a predicted step: PyTorch's allocated peak plus what its counters do not see.

`device_memory(pred)` adds to a CUDA-target `MemoryPrediction` (PyTorch-allocated bytes, the figure
``torch.cuda.max_memory_allocated`` reports) the terms a "will it fit on this card" answer needs. Each term
carries the source of its number:

- ``segments``: the caching allocator's segments, from a replay of the step's allocations and frees
  (`replay_allocator`) through the rules of ``c10/cuda/CUDACachingAllocator.cpp``: requests rounded up to
  512 B; requests ≤ 1 MiB served from 2 MiB "small pool" segments, 1–10 MiB from 20 MiB segments, larger
  ones from a segment of the request rounded up to 2 MiB; a cached free block is reused best-fit and split
  only when the remainder is ≥ 512 B (small pool) or > 1 MiB (large pool); adjacent free blocks merge;
  segments stay reserved until ``empty_cache``. The term is the replay's reserved peak minus the allocated peak.
- ``fragmentation``: reserved-but-unallocated memory beyond what one replayed step shows. The predecessor's
  OOM message (``../shared/seed/SEED_EVIDENCE.md``: 14.12 GiB allocated, 1.25 GiB reserved but unallocated,
  a 226 MiB request failed on a 15.89 GiB card) puts it at 8.9 % of the allocated bytes after 15 epochs; the
  allocator had already released its unused cached segments before raising, so this is slack inside segments
  that hold live blocks. We allow `FRAGMENTATION` (10 %) of the allocated peak in all, of which the replayed
  ``segments`` term is a part: ``fragmentation = max(0, FRAGMENTATION × allocated − segments)``.
- ``workspaces``: cuBLAS keeps one workspace per (handle, stream), and autograd's backward runs on its own
  device thread with its own handle: two. Each: the default ``CUBLAS_WORKSPACE_CONFIG`` ``:4096:2:16:8``
  (2 × 4 MiB + 8 × 16 KiB = 8,519,680 B; the block a user's ``memory_snapshot`` shows after one matmul,
  discuss.pytorch.org/t/178671), plus the cuBLASLt workspace PyTorch sizes by architecture (PR #120925:
  1 MiB; 4 MiB on sm80 with ≥ 24 GiB; 32 MiB on sm90+). They are allocated through the caching allocator,
  so the replay places them (first, as on the first matmul) and they count in ``max_memory_allocated`` too.
- ``cuda_context``: the CUDA context and the kernels' module images, outside PyTorch's allocator:
  `CUDA_CONTEXT_BYTES` = 0.5 GiB, between the 274 MiB (lazy module loading, PyTorch's default since 1.13)
  and 636 MiB (eager) that PyTorch PR #86509 measured after CUDA initialisation; kernels of cuBLAS / cuDNN /
  attention load on first use, so the lazy figure is a floor. The predecessor's OOM message implies 0.30 GiB
  outside the allocator on its card (15.89 GiB − 225 MiB free − 14.12 allocated − 1.25 reserved): 0.5 GiB
  errs on the safe side by 0.2 GiB there.

Not modelled (listed in ``unmodelled``): cuDNN's convolution workspace (the patch embedding; chosen per call
by cuDNN's heuristics, freed after), the fused-attention kernels' internal scratch beyond the tensors they
return, NCCL buffers, other processes on the card. No GPU has been lent to this project: every term is
unmeasured against a card until `benchmarks/gpu_memory.py` runs on one.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["device_memory", "DeviceMemory", "replay_allocator", "fits_on_gpu", "CUDA_CONTEXT_BYTES",
           "FRAGMENTATION", "cublas_workspace_bytes"]

MiB = 2 ** 20
GiB = 2 ** 30
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context + module images (module docstring: PR #86509's 274 / 636 MiB)
FRAGMENTATION = 0.10  # reserved-but-unallocated share of the allocated peak (the predecessor's log: 8.9 %), rounded up

# c10/cuda/CUDACachingAllocator.cpp
_MIN_BLOCK = 512  # kMinBlockSize: every request is rounded up to a multiple of it
_SMALL_SIZE = 1 * MiB  # kSmallSize: the largest "small pool" request
_SMALL_BUFFER = 2 * MiB  # kSmallBuffer: small-pool segment size
_LARGE_BUFFER = 20 * MiB  # kLargeBuffer: segment for requests between 1 and 10 MiB
_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc
_ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests get a segment rounded up to 2 MiB

_CUBLAS_WORKSPACE = 2 * 4096 * 1024 + 8 * 16 * 1024  # default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8"
_CUBLAS_HANDLES = 2  # the forward's thread and autograd's device thread (backward)


def cublas_workspace_bytes(sm_major: int = 8, gpu_bytes: int | None = None) -> int:
    """One handle's cuBLAS + cuBLASLt workspaces (module docstring): the cuBLASLt part by architecture."""
    lt = 32 * MiB if sm_major >= 9 else 4 * MiB if sm_major == 8 and (gpu_bytes or 0) >= 24 * GiB else 1 * MiB
    return _CUBLAS_WORKSPACE + lt


def _round(n: int) -> int:
    return max(_MIN_BLOCK, -(-n // _MIN_BLOCK) * _MIN_BLOCK)


def _segment_size(size: int) -> int:
    if size <= _SMALL_SIZE:
        return _SMALL_BUFFER
    if size < _MIN_LARGE_ALLOC:
        return _LARGE_BUFFER
    return -(-size // _ROUND_LARGE) * _ROUND_LARGE


def replay_allocator(trace: list[tuple[int, int]], persistent: tuple[int, ...] = ()) -> dict:
    """Replay allocations and frees through a model of PyTorch's CUDA caching allocator (module docstring).

    Args:
        trace: ``(id, bytes)`` for an allocation, ``(id, 0)`` for the free of that id, in order
            (`MemoryPrediction.trace`).
        persistent: sizes allocated first and never freed (the cuBLAS workspaces).

    Returns:
        ``{"reserved_peak": bytes, "allocated_peak": bytes, "segments": count}``: the allocated peak counts
        blocks as the allocator does (a block not split keeps its remainder allocated).
    """
    pools: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # small? -> sorted (size, seg, offset)
    blocks: list[dict[int, list]] = []  # per segment: offset -> [size, free]
    ends: list[dict[int, int]] = []  # per segment: end offset -> start offset of the block ending there
    small_segment: list[bool] = []
    live: dict[int, tuple[int, int, int]] = {}
    state = {"reserved": 0, "allocated": 0, "peak": 0}

    def alloc(key: int, n: int) -> None:
        size = _round(n)
        small = size <= _SMALL_SIZE
        pool = pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            bsize, seg, off = pool.pop(i)
        else:
            bsize, seg, off = _segment_size(size), len(blocks), 0
            blocks.append({0: [bsize, True]})
            small_segment.append(small)
            ends.append({bsize: 0})
            state["reserved"] += bsize
        rest = bsize - size
        if rest >= _MIN_BLOCK if small else rest > _SMALL_SIZE:
            blocks[seg][off] = [size, False]
            ends[seg][off + size] = off
            blocks[seg][off + size] = [rest, True]
            ends[seg][off + bsize] = off + size
            bisect.insort(pool, (rest, seg, off + size))
        else:
            size = bsize
            blocks[seg][off][1] = False
        live[key] = (seg, off, size)
        state["allocated"] += size
        state["peak"] = max(state["peak"], state["allocated"])

    def free(key: int) -> None:
        seg, off, size = live.pop(key)
        state["allocated"] -= size
        pool = pools[small_segment[seg]]
        nxt = blocks[seg].get(off + size)
        if nxt is not None and nxt[1]:  # merge with the next free block
            pool.remove((nxt[0], seg, off + size))
            del blocks[seg][off + size], ends[seg][off + size]
            size += nxt[0]
        prev = ends[seg].get(off)
        if prev is not None and blocks[seg][prev][1]:  # merge with the previous free block
            psize = blocks[seg][prev][0]
            pool.remove((psize, seg, prev))
            del blocks[seg][off], ends[seg][off]
            off, size = prev, size + psize
        blocks[seg][off] = [size, True]
        ends[seg][off + size] = off
        bisect.insort(pool, (size, seg, off))

    for i, n in enumerate(persistent):
        alloc(-1 - i, n)
    for key, n in trace:
        if n:
            alloc(key, n)
        elif key in live:
            free(key)
    return {"reserved_peak": state["reserved"], "allocated_peak": state["peak"], "segments": len(blocks)}


@dataclass
class DeviceMemory:
    """What the card must hold: ``terms`` maps a name to ``(bytes, source)``; ``device_bytes`` is their sum."""

    terms: dict[str, tuple[int, str]]
    unmodelled: list[str] = field(default_factory=list)

    @property
    def allocated_bytes(self) -> int:
        """The PyTorch-allocated peak (``max_memory_allocated``), workspaces included."""
        return self.terms["allocated"][0] + self.terms["workspaces"][0]

    @property
    def device_bytes(self) -> int:
        return sum(b for b, _ in self.terms.values())

    def fits(self, gpu_bytes: int) -> bool:
        return self.device_bytes <= gpu_bytes

    def as_dict(self) -> dict:
        return {"device_bytes": self.device_bytes, "allocated_bytes": self.allocated_bytes,
                "terms": {k: {"bytes": b, "source": s} for k, (b, s) in self.terms.items()},
                "unmodelled": list(self.unmodelled)}


def device_memory(pred, *, sm_major: int = 8, gpu_bytes: int | None = None,
                  context_bytes: int = CUDA_CONTEXT_BYTES) -> DeviceMemory:
    """What the card must hold for the worst step of `pred` (training, evaluation, after evaluation).

    Args:
        pred: a `MemoryPrediction` made with ``target="cuda"``.
        sm_major: the GPU's compute capability major (8: A100/A10/L4/RTX 30–40; 9: H100/H200; 7: V100/T4),
            which sizes the cuBLASLt workspace.
        gpu_bytes: the card's memory (sizes the cuBLASLt workspace on sm80).
        context_bytes: the CUDA context (default `CUDA_CONTEXT_BYTES`).
    """
    if pred.target != "cuda":
        raise ValueError("device_memory: the prediction was made for target='cpu'; predict with target='cuda'")
    if not pred.trace:
        raise ValueError("device_memory: the prediction has no allocation trace (made by measure_step_memory?)")
    allocated = pred.worst_bytes
    ws = cublas_workspace_bytes(sm_major, gpu_bytes)
    replay = replay_allocator(pred.trace, persistent=(ws,) * _CUBLAS_HANDLES)
    segments = max(0, replay["reserved_peak"] - allocated - _CUBLAS_HANDLES * ws)
    terms = {
        "allocated": (allocated, "predicted: live tensors of the step on meta tensors, 512 B blocks "
                                 "(diagnostics.memory.predict)"),
        "workspaces": (_CUBLAS_HANDLES * ws, f"cuBLAS + cuBLASLt workspaces, {_CUBLAS_HANDLES} handles "
                                             f"(PyTorch's CUBLAS_WORKSPACE_CONFIG default; PR #120925)"),
        "segments": (segments, f"caching-allocator replay ({replay['segments']} segments; "
                               f"c10/cuda/CUDACachingAllocator.cpp rules)"),
        "fragmentation": (max(0, int(FRAGMENTATION * allocated) - segments),
                          f"reserved-but-unallocated {FRAGMENTATION:.0%} of allocated in all, the replay's "
                          f"segments included (predecessor's OOM log: 1.25 GiB at 14.12 GiB, 8.9 %)"),
        "cuda_context": (context_bytes, "CUDA context + module images (PyTorch PR #86509: 274 MiB lazy, "
                                        "636 MiB eager loading; the predecessor's OOM implies 0.30 GiB)"),
    }
    return DeviceMemory(terms, unmodelled=[
        "cuDNN convolution workspace (patch embedding; per call, cuDNN heuristics)",
        "fused-attention kernels' internal scratch beyond the tensors they return",
        "NCCL buffers (multi-GPU), other processes on the card",
    ])


def fits_on_gpu(peak_bytes: int, gpu_bytes: int) -> bool:
    """The flat rule for a bare peak (no trace to replay): ``peak × (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES ≤
    gpu_bytes``. `device_memory` is the estimate `dcal memory` uses (segments replayed, workspaces added)."""
    return peak_bytes * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES <= gpu_bytes
