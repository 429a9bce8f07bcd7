"""Memory per step and per phase, leaks, what attention maps cost, and a step's peak predicted from shapes.

One module per concern: `tracker` (the CPU live-tensor tracker), `sources` (CUDA / CPU / RSS),
`profiler` (`MemoryProfiler`, `record_history`, `oom_snapshot`), `leaks` (`LeakDetector`,
`count_graph_tensors`, `find_graph_holders`), `estimate` (`attention_memory`), `predict`
(`predict_step_memory`: a step's peak from shapes alone, on meta tensors; `counting` and `step` are its
tracker and its step), `device` (`device_memory`: what the card must hold beyond PyTorch's counters),
`callback` (`MemoryCallback`).
`dcal memory` lives in `dcal_app.memory`; the predecessor system's design in `dcal_studies.predecessor`.
Every public name is re-exported here: ``diagnostics.memory.X`` keeps working.
"""
from .callback import MemoryCallback
from .device import CUDA_CONTEXT_BYTES, FRAGMENTATION, DeviceMemory, device_memory, fits_on_gpu
from .estimate import attention_memory
from .leaks import LeakDetector, count_graph_tensors, find_graph_holders
from .predict import (
    MemoryPrediction,
    MetaUnsupportedError,
    PhasePeak,
    measure_step_memory,
    predict_step_memory,
)
from .profiler import MemoryProfiler, oom_snapshot, record_history
from .sources import SOURCES

__all__ = [
    "MemoryProfiler", "MemoryCallback", "LeakDetector", "attention_memory",
    "count_graph_tensors", "find_graph_holders", "record_history", "oom_snapshot", "SOURCES",
    "predict_step_memory", "measure_step_memory", "MemoryPrediction", "PhasePeak", "MetaUnsupportedError",
    "device_memory", "DeviceMemory", "fits_on_gpu", "CUDA_CONTEXT_BYTES", "FRAGMENTATION",
]
