"""`watch`: the toolkit on a hand-written training loop, attached with one call.

    with diagnostics.watch(model, optimizer, loss_fn=criterion, out_dir="runs/mine", scaler=scaler,
                           replay=replay) as w:
        for x, y in loader:                      # the loop is the user's, unchanged
            ...

It attaches through public PyTorch hooks only, and its exit removes every one of them:

=====================================  ==========================================================================
hook                                   what it means for the watch
=====================================  ==========================================================================
``model`` forward pre-hook             a micro-batch starts (the first forward after a backward or a step; a
                                       forward under ``torch.no_grad()`` is an evaluation and is ignored)
``model`` forward hook                 without a criterion, the output's finite check (a scalar is the loss)
``loss_fn`` forward hook               the loss terms of the micro-batch (its output; its inputs when they are
                                       a list of branch losses, as `dcal.UncertaintyLoss` takes) and its
                                       labels (its arguments that carry no gradient)
a hook on the loss (and the output)    the backward starts
``optimizer`` step pre-hook            the backward is over: tier-1 checks, gradient norm, learning rate
``optimizer`` step post-hook           the step is done: its record is complete
=====================================  ==========================================================================

What it runs is the same machinery the `dcal.train.Trainer`'s callbacks use: `FiniteGuard` (tier-1 finite
checks on the loss terms, w and the gradient norm, one sync per step; tier 2 through ``replay``),
`MemoryMonitor` (the memory profiler with forward / backward / optimizer phases, sampled on CPU, and the
leak detector) and the run folder's one writer, `dcal.runfolder.RunWriter` (``metrics.jsonl``: ``step``
records with the run record's names, an ``end`` record; ``config.yaml``; ``train.log``). With ``out_dir`` the
folder is a run folder: `dcal doctor`, the plots and the run explorer read it.

Gradient accumulation: the micro-batches between two optimiser steps are one step; its record holds their
mean loss terms. GradScaler: a step the scaler skips never calls ``optimizer.step``; the watch sees the
scale drop at the next micro-batch (or at exit) and writes the step as ``skipped: true, skip_reason:
"amp-overflow"``, not as a fault (until `MAX_OVERFLOWS_IN_A_ROW` in a row). Until the first real step shows
how many micro-batches a step has, the scale is read (one host sync) at each micro-batch after a backward.

The package's modules: `core` (`Watch` and `watch`), `hooks` (what each hook does), `records` (step records,
the run folder, replay), `runconfig` (config.yaml) and `values` (`MicroBatch`, the warnings, reading loss
terms). Every name is importable from here.
"""
from __future__ import annotations

from dcal.runfolder import CONFIG_FILE, LOG_FILE, METRICS_FILE  # the run folder's names, as before

from ..nonfinite import MAX_OVERFLOWS_IN_A_ROW
from .core import MEMORY_OVERHEAD, MODES, RECORDS_KEPT, Watch, watch
from .values import LeakWarning, MicroBatch, NonFiniteWarning

__all__ = ["watch", "Watch", "MicroBatch", "LeakWarning", "NonFiniteWarning", "MEMORY_OVERHEAD",
           "MAX_OVERFLOWS_IN_A_ROW", "MODES", "RECORDS_KEPT", "CONFIG_FILE", "LOG_FILE", "METRICS_FILE"]
