"""dcal_studies.verdicts: every label from measured numbers, the precision rule, and the notebook assert."""
from __future__ import annotations

import math

import pytest

from dcal_studies.verdicts import (
    CONFIRMED,
    LABELS,
    NOT_REPRODUCED,
    NOT_TESTABLE,
    NUANCED,
    REFUTED,
    VERDICT_LINE,
    Verdict,
    VerdictError,
    combine,
    flip,
    format_measured,
    judge,
    not_testable,
    report,
)


@pytest.mark.parametrize("holds_if, effect, spread, label", [
    (">", 0.30, 0.05, CONFIRMED),        # band 0.25..0.35 wholly above 0.2
    (">", 0.10, 0.05, REFUTED),          # band 0.05..0.15 wholly below
    (">", 0.15, 0.05, REFUTED),          # band touches the threshold from below: the claim needs more
    (">", 0.22, 0.05, NOT_REPRODUCED),   # band 0.17..0.27 straddles 0.2
    ("<", 0.10, 0.05, CONFIRMED),
    ("<", 0.30, 0.05, REFUTED),
    ("<", 0.25, 0.05, REFUTED),          # band touches the threshold from above
    ("<", 0.18, 0.05, NOT_REPRODUCED),
    (">", 0.2000001, 0.0, CONFIRMED),    # an exact quantity: no band
    (">", 0.2, 0.0, REFUTED),            # exactly on the threshold does not pass it
])
def test_judge_labels_from_the_band(holds_if, effect, spread, label):
    v = judge("claim", effect, 0.2, holds_if=holds_if, spread=spread)
    assert v.label == label, v


def test_not_reproduced_symptom_overrides_the_effect_and_names_the_budget():
    v = judge("fix helps", 0.9, 0.2, spread=0.01, reproduced=False, budget="400 steps, 3 seeds")
    assert v.label == NOT_REPRODUCED
    assert "400 steps, 3 seeds" in v.reason and "symptom not reproduced" in v.reason


def test_straddle_says_not_resolved_with_the_budget():
    v = judge("sqrt trains better", 0.03, 0.02, spread=0.02, quantity="Δacc", budget="3 seeds")
    assert v.label == NOT_REPRODUCED and "straddles" in v.reason and "3 seeds" in v.reason


def test_reason_prints_the_numbers_at_their_precision():
    v = judge("w follows Σlr", 0.00031, 0.00055, holds_if="<", spread=0.00005, quantity="max |replay − log|")
    assert str(v) == "w follows Σlr → confirmed (max |replay − log| 0.00031 ± 0.00005 < 0.00055)"


@pytest.mark.parametrize("parts, label", [
    ([CONFIRMED, CONFIRMED], CONFIRMED),
    ([REFUTED, REFUTED], REFUTED),
    ([CONFIRMED, REFUTED], NUANCED),
    ([CONFIRMED, NOT_REPRODUCED], NOT_REPRODUCED),
    ([NUANCED, CONFIRMED], NUANCED),
    ([CONFIRMED, NOT_TESTABLE], NOT_TESTABLE),
    ([NOT_TESTABLE, NOT_TESTABLE], NOT_TESTABLE),
    ([NOT_TESTABLE, NOT_REPRODUCED], NOT_REPRODUCED),   # more budget could decide that part: say so first
])
def test_combine(parts, label):
    v = combine("whole", [Verdict(f"part {i}", p, "r") for i, p in enumerate(parts)])
    assert v.label == label
    assert all(f"part {i}: {p}" in v.reason for i, p in enumerate(parts))


def test_combine_needs_parts():
    with pytest.raises(VerdictError, match="whole"):
        combine("whole", [])


def test_expect_passes_and_chains_or_names_both_labels():
    v = judge("clamp engaged", 0.0835, 1.0)
    assert v.expect(REFUTED) is v
    with pytest.raises(AssertionError, match="'refuted'.*'confirmed'"):
        v.expect(CONFIRMED)
    with pytest.raises(VerdictError, match="not one of"):
        v.expect("partly")


def test_verdict_rejects_unknown_labels_and_multiline_reasons():
    with pytest.raises(VerdictError, match="maybe"):
        Verdict("c", "maybe", "r")
    with pytest.raises(VerdictError, match="one line"):
        Verdict("c", CONFIRMED, "a\nb")
    assert len(LABELS) == 5 and NOT_TESTABLE == "not testable here"


def test_untestable_overrides_the_effect_and_names_why():
    v = judge("the paper's selection beats random queries", 0.0, 0.0, spread=0.0, quantity="Δ top-1",
              untestable="every selection reaches top-1 1.000")
    assert v.label == NOT_TESTABLE
    assert str(v) == ("the paper's selection beats random queries → not testable here "
                      "(every selection reaches top-1 1.000; Δ top-1 0)")
    assert judge("c", 0.0, 0.0, untestable="").label == REFUTED  # empty reason: the benchmark decides


def test_not_testable_needs_a_one_line_reason_and_expect_accepts_it():
    v = not_testable("CLS head: the fallback changes a prediction", "the head reads CLS only")
    assert v.expect(NOT_TESTABLE) is v
    with pytest.raises(AssertionError, match="'not testable here'.*'refuted'"):
        v.expect(REFUTED)
    with pytest.raises(VerdictError, match="reason"):
        not_testable("c", "  ")
    with pytest.raises(VerdictError, match="one line"):
        not_testable("c", "a\nb")
    assert report([v]) == "CLS head: the fallback changes a prediction → not testable here (the head reads CLS only)"


@pytest.mark.parametrize("bad", [
    dict(effect=math.nan), dict(threshold=math.inf), dict(spread=-1.0), dict(holds_if=">="),
])
def test_judge_rejects_bad_inputs(bad):
    args = dict(effect=1.0, threshold=0.5) | bad
    with pytest.raises(VerdictError):
        judge("c", args.pop("effect"), args.pop("threshold"), **args)


@pytest.mark.parametrize("value, spread, text", [
    (0.08341, 0.00049, "0.0834 ± 0.0005"),
    (0.5, 0.14, "0.50 ± 0.14"),             # leading 1: two digits
    (123.4, 40.0, "120 ± 40"),
    (3.01e-7, 4e-8, "(3.0 ± 0.4)e-7"),       # noise-level values share a power of ten
    (2.0e6, 3.0e4, "(2.00 ± 0.03)e6"),
    (1.5625e-5, 0.0, "1.56e-05"),           # no spread: EXACT_DIGITS significant digits
    (-0.02, 0.003, "-0.020 ± 0.003"),
])
def test_format_measured(value, spread, text):
    assert format_measured(value, spread) == text


def test_report_one_line_per_verdict():
    vs = [judge("a", 1.0, 0.5), judge("b", 0.1, 0.5)]
    assert report(vs).splitlines() == [str(vs[0]), str(vs[1])]
    assert report(vs).splitlines()[1].startswith("b → refuted (effect 0.1 ≤ 0.5")


@pytest.mark.parametrize("label", LABELS)
def test_verdict_line_parses_every_label_and_keeps_claim_and_reason(label):
    v = Verdict("w → log L (the equilibrium)", label, "max |w| 0.0835 (clamp 1) < 1")
    m = VERDICT_LINE.match(str(v))
    assert m and m["label"] == label and m["claim"] == v.claim and m["reason"] == v.reason


def test_flip_asserts_a_change_and_its_line_is_not_a_verdict_line():
    v = judge("clamp engaged", 0.0835, 1.0)
    line = flip(v, judge("clamp engaged", 0.0835, 0.05), "threshold 1 → 0.05")
    assert line.startswith("flip under threshold 1 → 0.05: clamp engaged is confirmed, not refuted (")
    assert not VERDICT_LINE.match(line)
    with pytest.raises(AssertionError, match="did not flip"):
        flip(v, judge("clamp engaged", 0.0835, 0.5), "threshold 1 → 0.5")
