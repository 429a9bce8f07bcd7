"""The watch's step records and its run folder (through `dcal.runfolder.RunWriter`, the trainer's writer too),
and replaying a micro-batch under the RNG state it first ran with; `StepRecords` is a part of `Watch`."""
from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from dcal.runfolder import RunWriter

from ..nonfinite import (
    _loss_weights,
)
from .runconfig import run_config
from .values import LeakWarning, _floats


class StepRecords:
    """`Watch`'s records, run folder and replay (a mixin: the attributes are `Watch.__init__`'s)."""

    # ------------------------------------------------------------------ records
    def _end_step(self, values: Mapping[str, Any]) -> None:
        self.step += 1
        rec: dict[str, Any] = {"kind": "step", "step": self.step}
        rec.update({k: s / self._counts[k] for k, s in self._sums.items()})
        w = _loss_weights(self.loss_fn)
        if w is not None:
            for i, v in enumerate(w.detach().reshape(-1)):
                self._seen_names.add(f"w{i + 1}")
                rec[self.keys.get(f"w{i + 1}", f"w{i + 1}")] = v
        rec.update(values)
        if "nonfinite" in self._step_values:
            rec["nonfinite"] = self._step_values["nonfinite"]
        rec["micro_batches"] = self._n_micro
        if self._scale_begin is not None:
            rec["loss_scale"] = self._scale_begin
        rec["time"] = round(time.perf_counter() - self._t_start, 4)
        if self._monitor is not None:
            fields = self._monitor.step_end()
            if "leak" in fields:
                self.leak_report = self._monitor.leak_report
                self._log_line(f"leak at step {self.step}: {fields['leak']}")
                warnings.warn(f"step {self.step}: {fields['leak']}", LeakWarning, stacklevel=4)
            rec.update(fields)
        rec.update(self._logged)
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles = []
        self._reset_step()
        # Written when the next step starts (or at exit), so that `log` after optimizer.step() lands here.
        self._pending = {k: v for k, v in rec.items() if v is not None}

    def _flush(self, check_keys: bool = True) -> None:
        rec, self._pending = self._pending, None
        if rec is None:
            return
        rec = _floats(rec)
        if rec["step"] == 1:
            if check_keys:
                self._check_keys()
            self._write_config()
        self.records.append(rec)
        self._write(rec)

    def _check_keys(self) -> None:
        unmatched = sorted(set(self.user_keys) - self._seen_names)
        if unmatched:
            raise KeyError(f"watch: keys {unmatched} match no name of the first step; the names seen were "
                           f"{sorted(self._seen_names)} (criterion outputs and inputs, w1.., logged fields)")

    def _write(self, rec: dict) -> None:
        if self._run is not None:
            self._run.write(rec)

    # ------------------------------------------------------------------ the run folder
    def _open_run(self) -> None:
        if self.out_dir is None:
            return
        # A new watch refuses a folder that holds a run (RunFolderError naming metrics.jsonl); re-entering the
        # same watch continues its run.
        self._run = RunWriter(self.out_dir, resume=self.step > 0).open()

    def _write_config(self) -> None:
        if self._run is not None:
            self._run.write_config(self.config())

    def config(self) -> dict:
        """What the watch knows of the run, in `dcal train`'s config.yaml layout (the doctor reads it)."""
        return run_config(self)

    def _log_line(self, message: str) -> None:
        if self._run is not None:
            self._run.log(message)

    # ------------------------------------------------------------------ replay
    def _rng_state(self) -> tuple:
        dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        return torch.get_rng_state(), cuda, dev

    def _run_replay(self, item: tuple) -> None:
        mb, (cpu, cuda, dev) = item
        with torch.random.fork_rng(devices=[dev] if cuda is not None else []):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, dev)
            self.replay(mb)
