"""Labels as logs write them → this project's run-record names. The tables are data: add a row, not code.

A label is normalised (lower case, every run of non-alphanumerics → one space: ``Val Top-1 Acc`` →
``val top 1 acc``), a split word at its start or end (``val``, ``test``, ``eval``, ``train``, ...) is taken
off and says which records it belongs to, a percent word (``pct``, ``percent``) says the values are on a
0–100 scale, and the rest is matched against `METRIC_ALIASES` (first match wins). Validation names go to
the eval records (`val_acc`, `val_loss`, `acc_sa`, ...), the rest to the step records (`loss`, `loss_sa`,
`w_sa`, `lr`, `train_acc`, `train_acc_sa`, ...).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..stats import BRANCHES

__all__ = ["METRIC_ALIASES", "SETTING_ALIASES", "SPLIT_WORDS", "STEP_NAMES", "EVAL_NAMES", "CANONICAL_NAMES",
           "INDEX_ALIASES", "GUESSED_VAL_ALIASES", "Label", "normalise", "resolve", "resolve_setting", "resolve_index",
           "parse_mapping", "is_guess"]

# Words that name the split a metric was measured on; `test` and `eval` are read as validation (the
# held-out set the accuracy-collapse check reads).
SPLIT_WORDS = {"val": "val", "valid": "val", "validation": "val", "test": "val", "eval": "val",
               "evaluation": "val", "dev": "val", "train": "train", "training": "train", "trn": "train"}
PERCENT_WORDS = ("pct", "percent", "percentage")
# A unit word at the end of a memory label, → the factor to this project's MB (1e6 bytes, as
# `diagnostics.memory` writes mem_*_mb).
UNIT_WORDS = {"mb": 1.0, "mib": 2**20 / 1e6, "gb": 1e3, "gib": 2**30 / 1e6, "kb": 1e-3, "kib": 1024 / 1e6}
# Aggregation words that say nothing about the metric ("avg loss", "epoch_loss" in Keras' TensorBoard tags).
_FILLER = r"(?:(?:avg|average|mean|running|epoch|batch|smoothed|total)\s)?"

_BRANCH_WORDS = {"sa": r"sa|self attn|self attention|sa branch",
                 "glca": r"glca|global local|global local cross attention|glca branch",
                 "pwca": r"pwca|pair wise|pairwise|pair wise cross attention|pwca branch"}
_ACC = r"(?:acc|accuracy|top ?1|top ?1 acc(?:uracy)?|acc(?:uracy)? ?1|acc(?:uracy)? top ?1|prec(?:ision)? ?1)"
_ACC5 = r"(?:top ?5(?: acc(?:uracy)?)?|acc(?:uracy)? ?5|acc(?:uracy)? top ?5|prec(?:ision)? ?5)"


def _branch_rows() -> list[tuple[str, str]]:
    rows = []
    for i, b in enumerate(BRANCHES, start=1):
        n = _BRANCH_WORDS[b]
        rows += [
            (rf"^(?:{n}) loss$|^loss (?:{n})$|^l (?:{n})$", f"loss_{b}"),
            (rf"^(?:{n}) {_ACC}$|^{_ACC} (?:{n})$", f"acc_{b}"),
            # w1, w2, w3 are the branches in the order every DCAL paper and record uses (SA, GLCA, PWCA);
            # "w1 (SA)" confirms it. The effective weight e^(−w) ("Weight SA") is not w: not matched.
            (rf"^w ?{i}(?: (?:{n}))?$|^w (?:{n})$|^log ?vars? (?:{n}|{i - 1})$|^uncertainty w ?(?:{n}|{i})$",
             f"w_{b}"),
        ]
    return rows


METRIC_ALIASES: tuple[tuple[str, str], ...] = tuple(
    [(rf"^{_FILLER}(?:loss|l|objective|total loss|loss total|train loss)$", "loss")]
    + _branch_rows()
    + [
        (rf"^{_FILLER}{_ACC}$", "acc"),
        (rf"^{_FILLER}{_ACC5}$", "acc_top5"),
        (r"^(?:fused|combined|ensemble|sa glca) (?:acc|accuracy|top ?1)$", "acc_fused"),
        (r"^(?:lr|learning rate|lr 0|lr group 0|lr pg0|base lr|current lr)$", "lr"),
        (r"^(?:grad(?:ient)? ?norm|gnorm|total norm|grad norm total)$", "grad_norm"),
        (r"^(?:mem|memory|gpu mem(?:ory)?|cuda mem(?:ory)?|mem allocated|allocated|gpu mem allocated)$",
         "mem_allocated_mb"),
        (r"^(?:max mem(?:ory)?|peak mem(?:ory)?|mem peak|max allocated|max memory allocated|peak)$", "mem_peak_mb"),
        (r"^(?:mem reserved|reserved|memory reserved)$", "mem_reserved_mb"),
    ])

# Run settings a log states (usually in its header), used to derive optimiser steps per epoch.
SETTING_ALIASES: tuple[tuple[str, str], ...] = (
    (r"^(?:physical |micro |per device |per gpu |local )?batch ?size(?: per (?:gpu|device))?$", "batch_size"),
    (r"^(?:gradient|grad) accum(?:ulation)?(?: steps)?$|^accum(?:ulation)? steps$|^accumulate grad batches$",
     "grad_accum_steps"),
    (r"^(?:effective|global|total) batch ?size$", "global_batch"),
    (r"^(?:training|train) (?:samples|images|examples|size)$|^num train(?: samples)?$", "train_samples"),
    (r"^(?:num(?:ber)? (?:of )?classes|n classes|classes)$", "num_classes"),
    (r"^(?:steps|iters|iterations|optimi[sz]er steps) per epoch$", "steps_per_epoch"),
    (r"^(?:img|image|input) ?size$|^resolution$", "img_size"),
    # The run's stated length (for `truncated-log`): mmengine's max_epochs=5, HF's max_steps, "total steps: 10000".
    (r"^(?:total|max|num(?:ber of)?|planned) (?:train(?:ing)? |optimi[sz]er )?(?:steps|iters|iterations)$", "planned_steps"),
    (r"^(?:total|max|num(?:ber of)?|n|planned) (?:train(?:ing)? )?epochs$", "planned_epochs"),
)

# Index columns / keys (CSV, JSON lines, name=value pairs).
INDEX_ALIASES = {"epoch": r"^(?:epoch|epochs|ep)$", "step": r"^(?:step|steps|global step|iteration|iter|it)$"}

# The canonical names, and which records each belongs to.
STEP_NAMES = (("loss", "lr", "grad_norm", "mem_allocated_mb", "mem_reserved_mb", "mem_peak_mb", "train_acc",
               "train_acc_top5")
              + tuple(f"{k}_{b}" for k in ("loss", "w", "train_acc") for b in BRANCHES))
EVAL_NAMES = (("val_acc", "val_acc_top5", "val_loss", "acc_fused")
              + tuple(f"acc_{b}" for b in BRANCHES) + tuple(f"val_loss_{b}" for b in BRANCHES))
CANONICAL_NAMES = STEP_NAMES + EVAL_NAMES

# OpenMMLab evaluators' metric keys: written by validation (and test) only, so validation when no split is named.
EVALUATOR_KEYS = ("accuracy top1", "accuracy top5", "single label accuracy top1", "multi label precision")

# Names that are the validation accuracy only by inference: a log that writes a single validation "metric"
# or "score" (``Val Metric: 59.32``, as the predecessor's trainer did) usually means its accuracy. Read as
# val_acc only with a validation split word, and `is_guess` lets the importer say it guessed.
GUESSED_VAL_ALIASES: tuple[tuple[str, str], ...] = ((r"^(?:metric|score|main metric)$", "acc"),)

_COMPILED = [(re.compile(p), name) for p, name in METRIC_ALIASES]
_GUESSED = [(re.compile(p), name) for p, name in GUESSED_VAL_ALIASES]
_SETTINGS = [(re.compile(p), name) for p, name in SETTING_ALIASES]
_INDEX = {k: re.compile(p) for k, p in INDEX_ALIASES.items()}


@dataclass(frozen=True)
class Label:
    """What a label resolves to: the canonical ``name``, whether it belongs to the eval records, and
    whether the label itself says its values are percentages."""

    name: str
    eval: bool
    percent: bool = False
    scale: float = 1.0  # a unit word in the label (``mem_gb``): values × scale give the canonical unit


def normalise(label: str) -> str:
    """``Val Top-1 Acc`` → ``val top 1 acc``: lower case, runs of non-alphanumerics to one space."""
    return re.sub(r"[^a-z0-9]+", " ", str(label).lower()).strip()


def _split(words: list[str]) -> tuple[str | None, list[str]]:
    """The split word at the start or end of the label (if any) and the remaining words."""
    if len(words) > 1 and words[0] in SPLIT_WORDS:
        return SPLIT_WORDS[words[0]], words[1:]
    if len(words) > 1 and words[-1] in SPLIT_WORDS:
        return SPLIT_WORDS[words[-1]], words[:-1]
    return None, words


def _final(base: str, split: str) -> Label:
    """A base name (``acc``, ``loss_sa``) measured on `split` → its run-record name."""
    if split == "val":
        if base in ("acc_fused",) + tuple(f"acc_{b}" for b in BRANCHES):
            return Label(base, True)
        return Label(f"val_{base}", True)
    if base.startswith("acc"):
        return Label(f"train_{base}", False)
    return Label(base, False)


def resolve(label: str, default_split: str | None = None, mapping: dict[str, str] | None = None) -> Label | None:
    """The canonical name of a log label, or None when no alias matches.

    Args:
        label: the label as the log writes it (``Val Top-1 Acc``, ``loss/train``, ``w1 (SA)``).
        default_split: the split when the label names none (a "Validation:" section), else training.
        mapping: the user's names, canonical → label (``--map``); checked first, by normalised label.
    """
    return _resolve(label, default_split, tuple(mapping.items()) if mapping else ())


@functools.lru_cache(maxsize=4096)  # a log repeats the same few labels on every line
def _resolve(label: str, default_split: str | None, mapping: tuple) -> Label | None:
    norm = normalise(label)
    if mapping:
        for canonical, name in mapping:
            if normalise(name) == norm:
                return Label(canonical, canonical in EVAL_NAMES)
    words = norm.split()
    if not words:
        return None
    split, rest = _split(words)
    if split is None and default_split is None and "/" in label and " ".join(rest) in EVALUATOR_KEYS:
        split = "val"  # mmpretrain's evaluator keys (accuracy/top1): only validation writes them
    percent = len(rest) > 1 and rest[-1] in PERCENT_WORDS
    scale = UNIT_WORDS.get(rest[-1], 1.0) if len(rest) > 1 and not percent else 1.0
    if percent or scale != 1.0 or (len(rest) > 1 and rest[-1] in UNIT_WORDS):
        rest = rest[:-1]
    text = " ".join(rest)
    for pattern, base in _COMPILED:
        if pattern.match(text):
            out = _final(base, split or default_split or "train")
            if scale != 1.0 and not base.startswith("mem_"):
                return None  # a unit word on something that is not memory: not this metric
            if out.name not in CANONICAL_NAMES:
                return None  # "memory" or "lr" on a validation line (mmengine's Epoch(val)): no such record
            return Label(out.name, out.eval, percent, scale)
    if split == "val" and scale == 1.0 and any(p.match(text) for p, _ in _GUESSED):
        return Label("val_acc", True, percent)
    return None


def is_guess(label: str) -> bool:
    """Whether `label` resolves to val_acc only through `GUESSED_VAL_ALIASES` (the importer says so)."""
    words = _split(normalise(label).split())[1]
    return any(p.match(" ".join(words)) for p, _ in _GUESSED)


@functools.lru_cache(maxsize=4096)
def resolve_setting(label: str) -> str | None:
    """The run-setting name of a label (``Gradient accumulation steps`` → ``grad_accum_steps``), or None."""
    norm = normalise(label)
    return next((name for pattern, name in _SETTINGS if pattern.match(norm)), None)


@functools.lru_cache(maxsize=4096)
def resolve_index(label: str) -> str | None:
    """``epoch`` or ``step`` when the label names the record index ("Train Epoch" too), else None."""
    norm = " ".join(_split(normalise(label).split())[1])
    return next((k for k, p in _INDEX.items() if p.match(norm)), None)


def parse_mapping(items) -> dict[str, str]:
    """``["val_acc=Val Top-1", ...]`` (or a dict canonical → label) → {canonical: label}, validated.

    Raises ValueError naming the item and the canonical names allowed.
    """
    if items is None:
        return {}
    pairs = list(items.items()) if isinstance(items, dict) else []
    if not isinstance(items, dict):
        for item in items:
            canonical, sep, name = str(item).partition("=")
            if not sep or not canonical.strip() or not name.strip():
                raise ValueError(f"--map {item!r}: expected CANONICAL=NAME, e.g. val_acc='Val Top-1 Acc'")
            pairs.append((canonical.strip(), name.strip()))
    for canonical, _ in pairs:
        if canonical not in CANONICAL_NAMES:
            raise ValueError(f"--map {canonical}=...: {canonical!r} is not a canonical name; use one of "
                             f"{', '.join(CANONICAL_NAMES)}")
    return dict(pairs)
