"""Verdicts: one vocabulary for what a measurement says about a claim.

Every notebook ends by judging claims (the seed's, and our own readings of its log). The label is computed
from measured values and a stated threshold, never typed by hand, and the notebook asserts the label it
means to hold (`Verdict.expect`), so a change of measurement that flips a verdict fails `make test`.

The five labels:

- ``confirmed``: the effect the claim predicts was measured, beyond its spread, on the claim's side of the
  threshold.
- ``refuted``: the effect was measured, beyond its spread, on the other side of the threshold.
- ``not reproduced``: the claim could not be tested within the stated budget: the symptom it explains did
  not appear, or the measured band (effect ± spread) straddles the threshold (not resolved at this budget).
- ``nuanced``: a claim made of parts, each measured, some confirmed and some refuted: each side holds in
  part (`combine`).
- ``not testable here``: the benchmark cannot decide the claim whatever the measurement gives (every arm
  reaches the ceiling, the quantity the claim is about does not exist in the setting): the reason names why.
  Unlike ``not reproduced``, more budget would not help; a different benchmark would.

The printed line, parsed by tools/verdict_list.py: `report` (and `str(verdict)`) prints one verdict a line,
``<claim> → <label> (<reason>)``, label one of `LABELS`, reason on the same line. The README's verdict list
is generated from every such line in the notebooks' stored outputs (`VERDICT_LINE` is the pattern), so a
line of that shape IS a claim the notebook makes: keep the claim self-contained (claim, label, measured
number with its spread), and never print a perturbed, counterfactual verdict with `str()`; show it with
`flip`, whose line has another shape (``flip under <change>: <claim> is <label>, not <label> (<reason>)``).
One notebook may not print the same claim with two labels (the generator fails on it).

`format_measured` prints a value at the precision its spread supports (the notebooks' rule for "pass on
any machine": a noise-level digit printed is a digit that differs on another CPU).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

CONFIRMED = "confirmed"
REFUTED = "refuted"
NOT_REPRODUCED = "not reproduced"
NUANCED = "nuanced"
NOT_TESTABLE = "not testable here"
LABELS = (CONFIRMED, REFUTED, NOT_REPRODUCED, NUANCED, NOT_TESTABLE)
# One printed verdict line (`str(Verdict)`): what tools/verdict_list.py collects from stored outputs.
VERDICT_LINE = re.compile(r"^(?P<claim>\S.*?) → (?P<label>" + "|".join(map(re.escape, LABELS)) +
                          r") \((?P<reason>.*)\)$")

# Significant digits for a value printed without a spread (an exact or a thresholded number): 3 is what a
# reader compares by eye, and stays below the notebooks' output lint limit of 4 (tests/test_notebooks.py).
EXACT_DIGITS = 3
# A spread is printed with 1 significant digit, or 2 when its leading digit is 1 or 2 (so 0.14 does not
# collapse to 0.1, a 40 % change): the usual convention for uncertainties.
_TWO_DIGIT_LEAD_BELOW = 3.0
# Fixed point up to 6 decimals (an LR of 0.000016 reads well) and below 1e5; beyond, a shared power of ten.
_MAX_FIXED_DECIMALS, _FIXED_MAX_EXP = 6, 5
_COMPARATORS = (">", "<")


class VerdictError(ValueError):
    """A verdict asked for with inputs that cannot give one (unknown label, negative spread, NaN)."""


@dataclass(frozen=True)
class Verdict:
    """A claim, its label (one of `LABELS`) and a one-line reason with the numbers that decided it.

    Args:
        claim: the claim, in a few words ("bounds [−1, 1] changed w").
        label: one of `LABELS`.
        reason: one line: the measured numbers and the threshold they were compared with.
    """

    claim: str
    label: str
    reason: str

    def __post_init__(self):
        if self.label not in LABELS:
            raise VerdictError(f"verdict label {self.label!r} for claim {self.claim!r} is not one of {LABELS}")
        if "\n" in self.reason:
            raise VerdictError(f"verdict reason for claim {self.claim!r} must be one line, got {self.reason!r}")

    def __str__(self) -> str:
        return f"{self.claim} → {self.label} ({self.reason})"

    def expect(self, label: str) -> Verdict:
        """Assert that the measurement gave `label`; return self so a notebook can chain it.

        Args:
            label: the label the notebook's text states (one of `LABELS`).

        Raises:
            VerdictError: `label` is not a label.
            AssertionError: the measured label differs; the message gives both and the reason.
        """
        if label not in LABELS:
            raise VerdictError(f"expected label {label!r} is not one of {LABELS}")
        if self.label != label:
            raise AssertionError(f"verdict changed: {self.claim!r} is {self.label!r}, the notebook states "
                                 f"{label!r} ({self.reason})")
        return self


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise VerdictError(f"{name} must be a finite number, got {value!r}")
    return value


def _spread_decimals(spread: float) -> int:
    """Decimal places that show `spread` with 1 significant digit (2 when it starts with 1 or 2)."""
    exp = math.floor(math.log10(spread))
    lead = spread / 10.0**exp
    return -(exp - (1 if lead < _TWO_DIGIT_LEAD_BELOW else 0))


def format_measured(value: float, spread: float = 0.0, *, digits: int = EXACT_DIGITS) -> str:
    """A value at the precision its spread supports: ``0.0834 ± 0.0005``, ``15 ± 2``, ``1.6e-05``.

    Args:
        value: the measured value (mean over seeds, or a single measurement).
        spread: its spread (std over seeds, tolerance, rounding); 0 for an exact or thresholded number,
            which is then printed with `digits` significant digits.
        digits: significant digits for a value printed without spread.

    Raises:
        VerdictError: a non-finite value or spread, a negative spread, digits < 1.
    """
    value, spread = _check_finite("value", value), _check_finite("spread", spread)
    if spread < 0:
        raise VerdictError(f"spread must be >= 0, got {spread}")
    if digits < 1:
        raise VerdictError(f"digits must be >= 1, got {digits}")
    if spread == 0:
        return f"{value:.{digits}g}"
    decimals = _spread_decimals(spread)
    top = max(abs(value), spread)
    if decimals <= _MAX_FIXED_DECIMALS and top < 10.0**_FIXED_MAX_EXP:
        if decimals >= 0:
            return f"{value:.{decimals}f} ± {spread:.{decimals}f}"
        return f"{round(value, decimals):.0f} ± {round(spread, decimals):.0f}"
    exp = math.floor(math.log10(top))  # share one power of ten: (3.0 ± 0.1)e-7
    places = max(decimals + exp, 0)
    return f"({value / 10.0**exp:.{places}f} ± {spread / 10.0**exp:.{places}f})e{exp}"


def judge(claim: str, effect: float, threshold: float, *, holds_if: str = ">", spread: float = 0.0,
          reproduced: bool = True, quantity: str = "effect", budget: str = "",
          untestable: str = "") -> Verdict:
    """Label a claim from a measured effect, its spread and the threshold the claim needs.

    The band effect ± spread is compared with the threshold: wholly on the claim's side → confirmed;
    wholly on the other side (or on the threshold) → refuted; straddling it → not reproduced (not resolved
    at this budget). A symptom that did not appear (`reproduced=False`) gives not reproduced whatever the
    effect: the claim that explains it was not tested. A benchmark that cannot decide the claim
    (`untestable`, the reason why) gives not testable here whatever the effect.

    Args:
        claim: the claim, in a few words.
        effect: the measured value the claim is about (mean over seeds, a max error, a ratio...).
        threshold: the value the claim needs the effect to pass, stated with its reason by the caller.
        holds_if: ">" if the claim holds for effect above the threshold, "<" for below.
        spread: the effect's spread (std over seeds, or a stated tolerance); 0 for an exact quantity.
        reproduced: whether the symptom the claim is about appeared in the measurement.
        quantity: what `effect` is, for the reason line ("max |replay − log|").
        budget: the stated budget (steps, seeds), named in the reason when the label is not reproduced.
        untestable: why this benchmark cannot decide the claim ("every arm reaches top-1 1.000"), computed
            by the caller from its measurement; empty (the default) when it can.

    Raises:
        VerdictError: `holds_if` is not ">" or "<", or the numbers are not finite / the spread negative.
    """
    if holds_if not in _COMPARATORS:
        raise VerdictError(f"holds_if must be one of {_COMPARATORS}, got {holds_if!r}")
    effect, threshold = _check_finite("effect", effect), _check_finite("threshold", threshold)
    measured = f"{quantity} {format_measured(effect, spread)}"
    within = f" within {budget}" if budget else ""
    if untestable:
        return not_testable(claim, f"{untestable}; {measured}")
    if not reproduced:
        return Verdict(claim, NOT_REPRODUCED, f"symptom not reproduced{within}; {measured}")
    lo, hi = effect - spread, effect + spread
    above_wholly, below_wholly = lo > threshold, hi < threshold
    thr = format_measured(threshold)
    if holds_if == ">":
        if above_wholly:
            return Verdict(claim, CONFIRMED, f"{measured} > {thr}")
        if hi <= threshold:
            return Verdict(claim, REFUTED, f"{measured} ≤ {thr}")
    else:
        if below_wholly:
            return Verdict(claim, CONFIRMED, f"{measured} < {thr}")
        if lo >= threshold:
            return Verdict(claim, REFUTED, f"{measured} ≥ {thr}")
    return Verdict(claim, NOT_REPRODUCED, f"{measured} straddles {thr}: not resolved{within}")


def not_testable(claim: str, why: str) -> Verdict:
    """The verdict for a claim this benchmark cannot decide, with the (measured) reason why.

    Args:
        claim: the claim, in a few words.
        why: one line: what makes it undecidable here, with the numbers ("every selection reaches 1.000").

    Raises:
        VerdictError: an empty or multi-line reason.
    """
    if not why.strip():
        raise VerdictError(f"not_testable({claim!r}) needs the reason the benchmark cannot decide it")
    return Verdict(claim, NOT_TESTABLE, why)


def combine(claim: str, parts: Sequence[Verdict]) -> Verdict:
    """One verdict for a claim made of parts, each judged on its own measurement.

    All parts confirmed → confirmed; all refuted → refuted; some confirmed and some refuted (both sides
    measured) → nuanced; any part not reproduced → not reproduced (that part could not be tested at this
    budget); else any part not testable here → not testable here (that part cannot be decided here).

    Args:
        claim: the whole claim.
        parts: the parts' verdicts (from `judge` or `combine`).

    Raises:
        VerdictError: no parts.
    """
    if not parts:
        raise VerdictError(f"combine({claim!r}) needs at least one part")
    labels = {p.label for p in parts}
    summary = "; ".join(f"{p.claim}: {p.label}" for p in parts)
    if NOT_REPRODUCED in labels:
        return Verdict(claim, NOT_REPRODUCED, summary)
    if NOT_TESTABLE in labels:
        return Verdict(claim, NOT_TESTABLE, summary)
    if labels == {CONFIRMED}:
        return Verdict(claim, CONFIRMED, summary)
    if labels == {REFUTED}:
        return Verdict(claim, REFUTED, summary)
    return Verdict(claim, NUANCED, summary)


def flip(measured: Verdict, perturbed: Verdict, change: str) -> str:
    """Assert that a perturbed input flips a verdict; return the line to print (not a verdict line).

    The notebooks' control that a verdict can fail: judge the same measurement against a perturbed input or
    threshold and show the label changes. The returned line does not have the `VERDICT_LINE` shape, so the
    README's verdict list does not take the counterfactual for a claim.

    Args:
        measured: the verdict the notebook states.
        perturbed: the same claim judged on the perturbed input.
        change: what was perturbed, in a few words ("threshold 0.5 → 0.05").

    Raises:
        AssertionError: the label did not change (the verdict could not fail under this perturbation).
    """
    if perturbed.label == measured.label:
        raise AssertionError(f"verdict did not flip under {change}: {measured.claim!r} stays {measured.label!r} "
                             f"({perturbed.reason})")
    return f"flip under {change}: {perturbed.claim} is {perturbed.label}, not {measured.label} ({perturbed.reason})"


def report(verdicts: Sequence[Verdict]) -> str:
    """The verdicts as lines ``claim → label (numbers)``, for a notebook to print."""
    return "\n".join(str(v) for v in verdicts)
