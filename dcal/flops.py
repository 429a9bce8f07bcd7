"""FLOP counting with torch.utils.flop_counter, CPU fused attention included.

PyTorch's counter knows the CUDA SDPA kernels but not `_scaled_dot_product_flash_attention_for_cpu`, so on
CPU every fused attention would count as zero FLOPs. We register the same formula torch uses for the CUDA
kernels (forward: 2 matmuls; backward: 5), once, on import of this module. Likewise the in-place
`baddbmm_` (the explicit attention's scores on CPU, `dcal.layers`), which it counts only out of place.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import flop_counter as fc

__all__ = ["FlopCounter", "count_flops"]

_aten = torch.ops.aten


def _register_cpu_sdpa() -> None:
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


    inplace = getattr(_aten, "baddbmm_", None)
    if inplace is not None and inplace not in fc.flop_registry:

        @fc.register_flop_formula(inplace)
        def _baddbmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            (b, m, k), n = a_shape, b_shape[-1]
            return 2 * b * m * n * k  # torch's baddbmm formula: the matmul (the add is not counted)


_register_cpu_sdpa()

FlopCounter = fc.FlopCounterMode


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """Run `fn()` under a FlopCounterMode; return total FLOPs per module name (``"Global"`` for all)."""
    with fc.FlopCounterMode(display=False) as counter:
        fn()
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
