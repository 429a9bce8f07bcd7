"""Writes the small logs in this folder (run once; the files are committed). Each is a synthetic run in a
format that `diagnostics.import_log` reads (Keras `CSVLogger` CSV, DeiT-style JSON lines), shaped after a real
log of ../shared/logs/ecosystem (named in EXPECTED.json), with a fixed seed. EXPECTED.json says what the doctor
must and must not say on each, with the number of classes.

    python tests/data/logs/checks/generate.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def falling(n, start, end, rng, noise=0.02):
    return (end + (start - end) * np.exp(-5 * np.linspace(0, 1, n))) * (1 + noise * rng.standard_normal(n))


def rising(n, top, rng, noise=0.005, floor=0.05):
    return np.clip(floor + (top - floor) * (1 - np.exp(-6 * np.linspace(0, 1, n))) + noise * rng.standard_normal(n), 0, 1)


def keras_csv(name, **cols):
    n = len(next(iter(cols.values())))
    names = ["epoch", *cols]
    rows = [",".join(names)] + [",".join([str(i)] + [f"{cols[c][i]:.6g}" for c in cols]) for i in range(n)]
    (HERE / name).write_text("\n".join(rows) + "\n")


def keras_stdout(name, rows, planned, tail=()):
    """Keras 3 `fit` output: an `Epoch e/planned` line, then the epoch's progress line with its metrics."""
    lines = []
    for e, (loss, acc, val_loss, val_acc) in enumerate(rows, 1):
        lines += [f"Epoch {e}/{planned}", f"125/125 ━━━━━━━━━━━━━━━━━━━━ 12s 95ms/step - accuracy: {acc:.4f} - loss: "
                  f"{loss:.4f} - val_accuracy: {val_acc:.4f} - val_loss: {val_loss:.4f} - learning_rate: 0.0010"]
    (HERE / name).write_text("\n".join([*lines, *tail]) + "\n")


def jsonl(name, records):
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def main():
    rng = np.random.default_rng(0)
    n = 30
    keras_csv("keras-healthy-c10.csv", accuracy=rising(n, 0.95, rng), loss=falling(n, math.log(10), 0.15, rng),
              val_accuracy=rising(n, 0.88, rng), val_loss=falling(n, math.log(10), 0.4, rng))
    # road-surface: validation dips that recover, a validation loss that creeps up at 99 % accuracy
    val_acc = [0.66, 0.95, 0.95, 0.88, 0.70, 0.98, 0.99, 0.98, 0.61, 0.43, 0.97, 0.98, 0.99, 0.995, 0.98, 0.994,
               0.993, 0.993, 0.988, 0.995, 0.992, 0.995, 0.996, 0.994, 0.995, 0.991]
    val_loss = [1.34, 0.15, 0.15, 0.55, 3.31, 0.068, 0.053, 0.09, 7.33, 9.38, 0.16, 0.12, 0.027, 0.025, 0.086, 0.024,
                0.033, 0.039, 0.051, 0.039, 0.049, 0.040, 0.039, 0.039, 0.036, 0.072]
    m = len(val_acc)
    keras_csv("keras-healthy-noisy-validation-c4.csv", accuracy=rising(m, 0.999, rng, floor=0.85),
              loss=falling(m, 0.37, 0.004, rng), val_accuracy=np.array(val_acc), val_loss=np.array(val_loss))
    # pokemon: validation loss 2.97 → 5.71 while the training loss falls 4.8 → 0.12
    keras_csv("keras-overfit-c150.csv", accuracy=np.array([0.019, 0.139, 0.365, 0.568, 0.75, 0.867, 0.933, 0.961, 0.969, 0.969]),
              loss=np.array([4.82, 3.76, 2.56, 1.65, 0.955, 0.488, 0.24, 0.15, 0.116, 0.125]),
              val_accuracy=np.array([0.0425, 0.198, 0.293, 0.312, 0.322, 0.325, 0.327, 0.356, 0.33, 0.32]),
              val_loss=np.array([4.36, 3.41, 2.97, 3.23, 3.86, 4.33, 5.01, 5.26, 5.66, 5.71]))
    # DeepDiagnosis MNIST: a plain loss at ln 10 and the majority-class rate, the whole run
    n = 40
    keras_csv("keras-plain-loss-at-chance-c10.csv", accuracy=0.11 + 0.003 * rng.standard_normal(n),
              loss=math.log(10) + 0.0005 * rng.standard_normal(n), val_accuracy=np.full(n, 0.1135),
              val_loss=math.log(10) + 0.0005 * rng.standard_normal(n))
    # grape-vine: a validation loss of 10^8 against ln 5
    n = 10
    keras_csv("keras-diverged-c5.csv", accuracy=np.full(n, 0.2) + 0.01 * rng.standard_normal(n),
              loss=10 ** (7 + 0.5 * rng.standard_normal(n)), val_accuracy=np.full(n, 0.2),
              val_loss=10 ** (8.4 + 0.3 * rng.standard_normal(n)))
    # AUTOTRAINER oscillating loss: swings around 0.9 with no trend, C = 2
    n = 60
    swing = np.sign(np.sin(np.arange(n) * 2.1)) * (0.5 + rng.random(n))
    keras_csv("keras-oscillating-c2.csv", accuracy=0.55 + 0.04 * swing, loss=0.92 + 0.08 * swing,
              val_accuracy=0.56 + 0.08 * swing, val_loss=0.9 + 0.09 * swing)
    # mmengine isic2018 / TransFG CUB: the log states 10 epochs and stops after 3, with no message …
    rows = [(1.52, 0.45, 1.31, 0.52), (1.10, 0.61, 1.05, 0.63), (0.85, 0.71, 0.92, 0.68), (0.70, 0.76, 0.95, 0.67)]
    keras_stdout("keras-stdout-stopped-c5.txt", rows[:3], 10)
    # … and road-surface: early stopping after 4 of 10 epochs says so, and the run is complete
    keras_stdout("keras-stdout-early-stopping-c5.txt", rows, 10,
                 ["Epoch 4: early stopping", "Restoring model weights from the end of the best epoch: 3."])
    # DeiT: 77.8 % at epoch ~200, 60.5 % after it, ends at 65 %; and the same run without the break
    n, at = 300, 200
    acc = np.r_[np.linspace(0.005, 0.778, at), np.linspace(0.605, 0.65, n - at)] + 0.002 * rng.standard_normal(n)
    loss = np.r_[np.linspace(6.92, 4.51, at), np.linspace(4.69, 4.35, n - at)]
    jsonl("deit-style-regression.jsonl", [{"epoch": e, "train_loss": round(float(loss[e]), 4),
                                           "val_acc": round(float(acc[e]), 4)} for e in range(n)])
    acc = 0.005 + 0.645 * (1 - np.exp(-5 * np.linspace(0, 1, n))) + 0.002 * rng.standard_normal(n)
    jsonl("deit-style-healthy.jsonl", [{"epoch": e, "train_loss": round(float(6.92 - 2.57 * (1 - math.exp(-5 * e / n))), 4),
                                        "val_acc": round(float(acc[e]), 4)} for e in range(n)])


if __name__ == "__main__":
    main()
