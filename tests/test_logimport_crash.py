"""How a run ended, in every wording and shape a log writes it (issue 16 item 3): CUDA's caching-allocator OOM
("Tried to allocate ..."), cudaMalloc's "CUDA error: out of memory", OutOfMemoryError, cuDNN errors, MPS and
CPU allocator failures, RuntimeError / ImportError / KeyboardInterrupt and "Error(s) in loading state_dict",
each as a plain traceback, with time stamps and log levels on every line, as IPython prints it in a notebook
(ANSI colours), and hard-wrapped by a console (PowerShell ``2>&1``)."""
from __future__ import annotations

import pytest

from diagnostics import import_log
from diagnostics.logimport.crash import exception_kind, oom_device, parse_oom
from diagnostics.logimport.text import strip_prefix
from diagnostics.logimport.unwrap import unwrap, wrap_width

ESC = "\x1b"
# (type, message, kind)
WORDINGS = {
    "cuda-caching-allocator": ("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 226.00 MiB. GPU 0 has "
                               "a total capacity of 15.89 GiB of which 225.12 MiB is free.", "oom"),
    "cudamalloc": ("RuntimeError", "CUDA error: out of memory", "oom"),
    "old-oom-class": ("torch.cuda.OutOfMemoryError", "CUDA out of memory.", "oom"),
    "cudnn": ("RuntimeError", "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", "exception"),
    "mps": ("RuntimeError", "MPS backend out of memory (MPS allocated: 17.95 GB, other allocations: 1.20 GB, max "
            "allowed: 18.13 GB). Tried to allocate 512.00 MB on private pool.", "oom"),
    "cpu-allocator": ("RuntimeError", "[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not enough "
                      "memory: you tried to allocate 2147483648 bytes.", "oom"),
    "import": ("ImportError", "numpy.core.multiarray failed to import", "exception"),
    "keyboard-interrupt": ("KeyboardInterrupt", "", "exception"),
    "state-dict": ("RuntimeError", "Error(s) in loading state_dict for DCAL: Missing key(s) in state_dict: "
                   "\"head.weight\".", "exception"),
}
METRICS = [f"epoch {e} loss: {2.0 - 0.3 * e:.3f} val_acc: {0.3 + 0.1 * e:.3f}" for e in range(1, 4)]


def _exception_line(type_: str, message: str) -> str:
    return f"{type_}: {message}" if message else type_


def plain(type_, message):
    return METRICS + ["Traceback (most recent call last):", '  File "train.py", line 88, in <module>',
                      "    loss.backward()", _exception_line(type_, message)]


def timestamped(type_, message):
    return [f"2024-05-02 11:12:{i:02d},457 - {'ERROR' if i >= 3 else 'INFO'} - {line}"
            for i, line in enumerate(plain(type_, message))]


def ipython(type_, message):
    short = type_.rsplit(".", 1)[-1]
    return METRICS + [
        f"{ESC}[31m---------------------------------------------------------------------------{ESC}[39m",
        f"{ESC}[31m{short}{ESC}[39m                              Traceback (most recent call last)",
        f"Cell {ESC}[32mIn[16], line 3{ESC}[39m", f"{ESC}[32m      1{ESC}[39m model.train()",
        f"{ESC}[32m----> 3{ESC}[39m loss.backward()", "",
        f"{ESC}[36mFile {ESC}[39m{ESC}[32m/venv/lib/site-packages/torch/_tensor.py:581{ESC}[39m, in "
        f"{ESC}[36mTensor.backward{ESC}[39m{ESC}[34m(self, gradient){ESC}[39m",
        f"{ESC}[32m--> 581{ESC}[39m torch.autograd.backward(", "",
        f"{ESC}[31m{type_}{ESC}[39m" + (f": {message}" if message else "")]


def hard_wrapped(type_, message, width=27):
    out = []
    for line in plain(type_, message) + [f"note {i}: the quick brown fox jumps over the dog" for i in range(12)]:
        while len(line) > width:
            cut = line.rfind(" ", 0, width)
            cut = width if cut <= 0 else cut + 1
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out


SHAPES = {"plain": plain, "timestamped": timestamped, "ipython": ipython, "hard-wrapped": hard_wrapped}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wording", WORDINGS)
def test_every_wording_in_every_shape(tmp_path, wording, shape):
    type_, message, kind = WORDINGS[wording]
    path = tmp_path / "train_log.txt"
    path.write_text("\n".join(SHAPES[shape](type_, message)) + "\n", encoding="utf-8")
    log = import_log(path)
    assert log.end is not None and log.end.status == "crashed", f"{shape}/{wording}: no crash read"
    assert log.end.exception["type"].rsplit(".", 1)[-1] == type_.rsplit(".", 1)[-1]
    assert log.end.exception["message"].split("\n")[0].startswith(message[:40])
    assert log.end.context["kind"] == kind
    assert len(log.evals) == 3  # the metrics before the crash are still read


def test_the_level_stripper_keeps_an_exception_head():
    """It used to match "CUDA error:" case-insensitively as a log level and eat "RuntimeError: CUDA error:"."""
    for line in ("RuntimeError: CUDA error: out of memory", "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
                 "RuntimeError: Error(s) in loading state_dict for ViT:"):
        assert strip_prefix(line) == line
    assert strip_prefix("2024-05-02 11:12:13,457 - ERROR - RuntimeError: CUDA error: out of memory") == \
        "RuntimeError: CUDA error: out of memory"
    assert strip_prefix("INFO:root:epoch 3 loss 0.5") == "epoch 3 loss 0.5"


@pytest.mark.parametrize("message,expected", [
    ("CUDA out of memory. Tried to allocate 20.00 MiB", "oom"),
    ("CUDA error: out of memory", "oom"),
    ("MPS backend out of memory (MPS allocated: 1 GB)", "oom"),
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024 bytes", "oom"),
    ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", "exception"),
    ("Loss is nan, stopping training", "nonfinite"),
    ("numpy.core.multiarray failed to import", "exception"),
])
def test_exception_kind(message, expected):
    assert exception_kind("RuntimeError", message) == expected


@pytest.mark.parametrize("wording,device", [("cuda-caching-allocator", "CUDA"), ("cudamalloc", "CUDA"),
                                             ("old-oom-class", "CUDA"), ("mps", "MPS"), ("cpu-allocator", "CPU")])
def test_the_oom_finding_names_the_memory_that_ran_out(tmp_path, wording, device):
    """An MPS or host-allocator OOM is not called "CUDA out of memory"."""
    from diagnostics.doctor import diagnose

    type_, message, _ = WORDINGS[wording]
    assert oom_device(type_, message) == device
    path = tmp_path / "train_log.txt"
    path.write_text("\n".join(plain(type_, message)) + "\n", encoding="utf-8")
    f = next(f for f in diagnose(import_log(path)) if f.code == "oom")
    assert f.message.startswith(f"{device} out of memory at "), f.message
    assert oom_device("MemoryError", "") == "CPU" and oom_device("RuntimeError", "XPU out of memory.") == "XPU"


def test_allocator_numbers_only_where_the_message_has_them():
    assert parse_oom("CUDA error: out of memory") == {"text": {}}
    assert parse_oom("CUDA out of memory. Tried to allocate 2.00 GiB")["requested"] == 2 * 2**30


def test_unwrap_joins_only_a_wrapped_file():
    wrapped = hard_wrapped("ImportError", "numpy.core.multiarray failed to import")
    lines, width = unwrap(wrapped)
    assert 20 <= width <= 27  # the longest line: a word wrap may leave every line short of the console's 27
    assert (any(text == "ImportError: numpy.core.multiarray failed to import" for _, text in lines))
    table = [f"{i:>5} | {0.1 * i:10.4f} | {0.2 * i:10.4f} | healthy row" for i in range(40)]  # fixed width, no spaces at the end
    assert wrap_width(table) is None


def test_a_tqdm_bar_with_float_counts_is_a_bar_not_an_epoch_summary(tmp_path):
    """tqdm writes ``99.0/171`` (float n) mid-epoch; such a bar's running postfix must not replace the epoch
    summary line it follows (the pokemon log read 3.96 for epoch 1, whose summary says 4.8177)."""
    from diagnostics.logimport import import_log

    log = tmp_path / "keras_tqdm.txt"
    log.write_text(
        "2025-06-14 22:57:19,981 - INFO - 100%|##########| 171/171 [00:25<00:00, 7.58batch/s, accuracy=0.019, loss=4.82]\n"
        "2025-06-14 22:57:21,314 - INFO - Epoch 1: \n"
        "2025-06-14 22:57:21,314 - INFO - loss=4.8177, accuracy=0.0190, \n"
        "2025-06-14 22:57:21,314 - INFO - val_loss=4.3607, val_accuracy=0.0425\n"
        "2025-06-14 22:57:21,315 - INFO - 0%|          | 0.00/171 [00:00<?, ?batch/s, accuracy=0.019, loss=4.82]\n"
        "2025-06-14 22:58:04,973 - INFO - 58%|#####7    | 99.0/171 [00:43<00:42, 1.69batch/s, accuracy=0.11, loss=3.96]\n"
        "2025-06-14 22:58:21,053 - INFO - Epoch 2: \n"
        "2025-06-14 22:58:21,053 - INFO - loss=3.7617, accuracy=0.1390, \n"
        "2025-06-14 22:58:21,053 - INFO - val_loss=3.4104, val_accuracy=0.1978\n")
    run = import_log(log, num_classes=150)
    assert run.steps["loss"].tolist() == [4.8177, 3.7617]
    assert run.steps["train_acc"].tolist() == [0.019, 0.139]
