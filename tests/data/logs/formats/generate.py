"""Writes the small logs in this folder (run once; the files are committed): one healthy and one broken run in
each format `diagnostics.import_log` has a native reader for, written the way the framework writes it (HF
`trainer_state.json`, Lightning `metrics.csv`, timm `summary.csv`, DeiT `log.txt`, mmengine text log and
`scalars.json`, Keras CSV and `fit` output, notebook output with ANSI codes, a hard-wrapped console capture),
with a fixed seed. EXPECTED.json says what the doctor must and must not say on each (tests/test_logimport_formats.py).

    python tests/data/logs/formats/generate.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RNG = np.random.default_rng(16)
ESC = "\x1b"


def falling(n, start, end, noise=0.01):
    return (end + (start - end) * np.exp(-4 * np.linspace(0, 1, n))) * (1 + noise * RNG.standard_normal(n))


def rising(n, start, top, noise=0.003):
    return np.clip(start + (top - start) * (1 - np.exp(-4 * np.linspace(0, 1, n))) + noise * RNG.standard_normal(n),
                   0, 1)


def write(name: str, text: str) -> None:
    (HERE / name).write_text(text, encoding="utf-8")


def hf(name: str, acc_end: float, n_eval: int = 6, steps_per_eval: int = 100) -> None:
    steps = n_eval * steps_per_eval
    loss = falling(steps // 20, 2.3, 0.2 if acc_end > 0.5 else 2.3)
    acc = rising(n_eval, 0.5 if acc_end > 0.5 else 0.1, acc_end)
    history = []
    for k in range(steps // 20):
        step = (k + 1) * 20
        history.append({"epoch": round(step / 200, 2), "grad_norm": 1.0, "learning_rate": 5e-5 * (1 - step / steps),
                        "loss": round(float(loss[k]), 4), "step": step})
        if step % steps_per_eval == 0:
            i = step // steps_per_eval - 1
            history.append({"epoch": round(step / 200, 2), "eval_accuracy": float(acc[i]),
                            "eval_loss": float(loss[k]) * 1.1, "eval_runtime": 3.2, "eval_samples_per_second": 80.1,
                            "eval_steps_per_second": 10.0, "step": step})
    history.append({"epoch": steps / 200, "step": steps, "total_flos": 1e15, "train_loss": float(loss.mean()),
                    "train_runtime": 120.0, "train_samples_per_second": 40.0, "train_steps_per_second": 5.0})
    write(name, json.dumps({"best_metric": None, "epoch": steps / 200, "global_step": steps, "log_history": history,
                            "max_steps": steps, "num_train_epochs": steps // 200, "train_batch_size": 8}, indent=2))


def lightning(name: str, nan_at: int | None) -> None:
    cols = ["epoch", "step", "lr-AdamW", "train_loss_epoch", "train_loss_step", "val_acc", "val_loss"]
    rows = [",".join(cols)]
    epochs, per_epoch, every = 8, 100, 25
    loss = falling(epochs * per_epoch // every, 2.3, 0.3)
    acc = rising(epochs, 0.4, 0.93)
    k = 0
    for e in range(epochs):
        for s in range(every - 1, per_epoch, every):
            step = e * per_epoch + s
            value = "nan" if nan_at is not None and k >= nan_at else f"{loss[k]:.5f}"
            rows.append(f"{e},{step},{1e-3 * (1 - step / 800):.6g},,{value},,")
            k += 1
        end = e * per_epoch + per_epoch - 1
        rows.append(f"{e},{end},,,,{acc[e]:.5f},{loss[k - 1] * 1.05:.5f}")
        rows.append(f"{e},{end},,{loss[k - 4:k].mean():.5f},,,")
    write(name, "\n".join(rows) + "\n")


def timm_summary(name: str, top1) -> None:
    rows = ["epoch,train_loss,eval_loss,eval_top1,eval_top5,lr"]
    loss = falling(len(top1), 4.6, 1.0)
    for e, t in enumerate(top1):
        rows.append(f"{e},{loss[e]:.6f},{loss[e] * 1.1:.6f},{t:.3f},{min(100.0, t + 20):.3f},{1e-3 * 0.97 ** e:.6g}")
    write(name, "\n".join(rows) + "\n")


def deit(name: str, n: int = 30) -> None:
    loss = falling(n, 6.9, 3.0)
    acc = rising(n, 0.001, 0.72)
    lines = [json.dumps({"train_lr": 1e-3 * 0.95 ** e, "train_loss": float(loss[e]), "test_loss": float(loss[e]) * 0.6,
                         "test_acc1": float(acc[e]) * 100, "test_acc5": min(100.0, float(acc[e]) * 120),
                         "epoch": e, "n_parameters": 5717416}) for e in range(n)]
    write(name, "\n".join(lines) + "\n")


def mmengine(name: str, crash: bool) -> None:
    global RNG
    RNG = np.random.default_rng(7)  # the same run as mmengine_scalars writes
    epochs, n = 4, 300
    loss = falling(epochs * n // 100, 2.3, 0.5)
    acc = rising(epochs, 0.45, 0.88)
    head = ["2024/03/01 10:00:00 - mmengine - INFO - ", "------------------------------------------------------------",
            "Config:", "model = dict(type='ImageClassifier', head=dict(num_classes=10, loss=dict(type='CrossEntropyLoss')))",
            "optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=0.0001))",
            "param_scheduler = dict(type='MultiStepLR', by_epoch=True, milestones=[2, 3], gamma=0.1)",
            "train_cfg = dict(by_epoch=True, max_epochs=4, val_interval=1)", ""]
    lines, k = list(head), 0
    for e in range(1, epochs + 1):
        for i in range(100, n + 1, 100):
            lines.append(f"2024/03/01 10:{e:02d}:{i // 10:02d} - mmengine - INFO - Epoch(train) [{e}][{i:>3}/{n}]  "
                         f"lr: {0.1 * 0.1 ** (e // 3):.4e}  eta: 0:0{epochs - e}:00  time: 0.1000  data_time: 0.0100  "
                         f"memory: 1500  loss: {loss[k]:.4f}")
            k += 1
            if crash and e == 3 and i == 200:
                lines += ["Traceback (most recent call last):",
                          '  File "tools/train.py", line 121, in <module>', "    main()",
                          '  File "/opt/conda/lib/python3.10/site-packages/torch/autograd/__init__.py", line 266, in backward',
                          "    Variable._execution_engine.run_backward(",
                          "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                          "capacity of 23.69 GiB of which 1.02 GiB is free. Of the allocated memory 21.50 GiB is "
                          "allocated by PyTorch, and 0.90 GiB is reserved by PyTorch but unallocated."]
                write(name, "\n".join(lines) + "\n")
                return
        lines.append(f"2024/03/01 10:{e:02d}:59 - mmengine - INFO - Epoch(val) [{e}][20/20]    accuracy/top1: "
                     f"{acc[e - 1] * 100:.4f}  accuracy/top5: {min(100, acc[e - 1] * 110):.4f}  data_time: 0.0100  time: 0.0500")
    write(name, "\n".join(lines) + "\n")


def mmengine_scalars(name: str) -> None:
    global RNG
    RNG = np.random.default_rng(7)
    epochs, n = 4, 300
    loss = falling(epochs * n // 100, 2.3, 0.5)
    acc = rising(epochs, 0.45, 0.88)
    lines, k = [], 0
    for e in range(1, epochs + 1):
        for i in range(100, n + 1, 100):
            lines.append(json.dumps({"lr": 0.1, "data_time": 0.01, "loss": float(loss[k]), "time": 0.1, "epoch": e,
                                     "memory": 1500, "step": (e - 1) * n + i}))
            k += 1
        lines.append(json.dumps({"accuracy/top1": float(acc[e - 1]) * 100, "data_time": 0.01, "time": 0.05, "step": e}))
    write(name, "\n".join(lines) + "\n")


def keras_csv(name: str, val_acc, val_loss) -> None:
    n = len(val_acc)
    loss, acc = falling(n, 1.6, 0.1), rising(n, 0.3, 0.98)
    rows = ["epoch,accuracy,loss,lr,val_accuracy,val_loss"]
    rows += [f"{e},{acc[e]:.4f},{loss[e]:.4f},0.001,{val_acc[e]:.4f},{val_loss[e]:.4f}" for e in range(n)]
    write(name, "\n".join(rows) + "\n")


def keras_stdout(name: str, crash: bool) -> None:
    n, planned = 12, 30
    loss, acc, vacc = falling(n, 1.2, 0.1), rising(n, 0.5, 0.97), rising(n, 0.5, 0.94)
    lines = ["Found 4000 images belonging to 5 classes."]
    for e in range(n):
        lines.append(f"Epoch {e + 1}/{planned}")
        lines.append(f"125/125 ━━━━━━━━━━━━━━━━━━━━ 9s 70ms/step - accuracy: {acc[e]:.4f} - loss: {loss[e]:.4f} - "
                     f"val_accuracy: {vacc[e]:.4f} - val_loss: {loss[e] * 1.2:.4f} - learning_rate: 0.0010")
    if crash:
        lines += ["2024-05-02 11:12:13.456789: E tensorflow/core/framework/op_kernel.cc:1818] failed",
                  "2024-05-02 11:12:13,457 - ERROR - RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"]
    else:
        lines += [f"Epoch {n}: early stopping", "Restoring model weights from the end of the best epoch: 10."]
    write(name, "\n".join(lines) + "\n")


def notebook(name: str, crash: bool) -> None:
    loss, acc = falling(3, 1.0, 0.3), rising(3, 0.6, 0.9)
    lines = []
    for e in range(3):
        lines.append(f"Epoch {e + 1}/3: 100%|{'█' * 20}| 500/500 [02:00<00:00,  4.1it/s, loss={loss[e]:.3f}, acc={acc[e]:.3f}]")
        lines += [f"Epoch {e + 1}/3 Summary:", "   Metric      Train      Validation", "   " + "-" * 35,
                  f"   Loss        {loss[e]:.4f}     {loss[e] * 1.1:.4f}", f"   Accuracy    {acc[e]:.4f}     {acc[e] - 0.02:.4f}", ""]
    if crash:
        lines += [f"{ESC}[31m---------------------------------------------------------------------------{ESC}[39m",
                  f"{ESC}[31mKeyError{ESC}[39m                                  Traceback (most recent call last)",
                  f"Cell {ESC}[32mIn[7], line 4{ESC}[39m", f"{ESC}[32m      2{ESC}[39m for batch in loader:",
                  f"{ESC}[32m----> 4{ESC}[39m     x = batch[{ESC}[33m'pixel_values'{ESC}[39m]", "",
                  f"{ESC}[31mKeyError{ESC}[39m: 'pixel_values'"]
    write(name, "\n".join(lines) + "\n")


def wrapped(name: str, width: int = 30) -> None:
    """A PowerShell `2>&1` capture: every line cut at `width` columns, at a space where it can be."""
    loss = falling(5, 2.0, 0.8)
    logical = [f"epoch {e + 1} loss: {loss[e]:.4f} val_acc: {0.5 + 0.05 * e:.4f}" for e in range(5)]
    logical += ["Traceback (most recent call last):", '  File "C:\\Users\\me\\proj\\train.py", line 88, in <module>',
                "    loss.backward()",
                "RuntimeError: MPS backend out of memory (MPS allocated: 17.95 GB, other allocations: 1.20 GB, max "
                "allowed: 18.13 GB). Tried to allocate 512.00 MB on private pool."]
    logical += [f"note {i}: the quick brown fox jumps over the lazy dog again and again" for i in range(8)]
    out = []
    for line in logical:
        while len(line) > width:
            cut = line.rfind(" ", 0, width)
            cut = width if cut <= 0 else cut + 1
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    write(name, "\n".join(out) + "\n")


if __name__ == "__main__":
    hf("hf-healthy-c10-trainer_state.json", 0.92)
    hf("hf-chance-c10-trainer_state.json", 0.1)
    lightning("lightning-healthy-c10-metrics.csv", None)
    lightning("lightning-nan-c10-metrics.csv", 9)
    timm_summary("timm-healthy-c100-summary.csv", 100 * rising(20, 0.02, 0.78))
    timm_summary("timm-collapse-c100-summary.csv", [5, 20, 35, 45, 50, 48, 30, 15, 8, 5, 4, 4])
    deit("deit-healthy-c1000-log.txt")
    mmengine("mmengine-healthy-c10.log", crash=False)
    mmengine("mmengine-oom-c10.log", crash=True)
    mmengine_scalars("mmengine-healthy-c10-scalars.json")
    keras_csv("keras-healthy-c5-log.csv", rising(15, 0.5, 0.95), falling(15, 1.1, 0.2))
    keras_stdout("keras-healthy-c5-stdout.txt", crash=False)
    keras_stdout("keras-cudnn-crash-c5-stdout.txt", crash=True)
    notebook("notebook-healthy-c3.txt", crash=False)
    notebook("notebook-keyerror-c3.txt", crash=True)
    wrapped("wrapped-mps-oom-c10.txt")
