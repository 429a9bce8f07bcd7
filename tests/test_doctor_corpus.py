"""The doctor on real logs: every log in ../shared/logs/ecosystem/ (MANIFEST.md) and ../shared/logs/seed-history/
(README.md) against the expectations transcribed in tests/data/doctor_corpus.yaml (what it must and must not
say, its exit status, the format it must recognise, what it must read). Skipped, with the reason, when
../shared is not beside the repository.

Each log runs through `dcal doctor` in process (`dcal_app.doctor.main`, ``--json``), and its reading through
`diagnostics.doctor.read_log` for the record-level facts. The MANIFEST's "ideally" items are listed apart: a
soft one is an xfail (strict=False) naming what the doctor does not yet say, a ``hard: true`` one a failure.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from dcal_app.doctor import main as doctor_main
from diagnostics.doctor import read_log

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT.parent / "shared" / "logs"
CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "doctor_corpus.yaml").read_text(encoding="utf-8"))
NOT_A_DIAGNOSIS = ("log-import", "check-skipped")

pytestmark = pytest.mark.skipif(not LOGS.is_dir(), reason=f"{LOGS} is absent: the shared log corpus sits beside "
                                "the repository (../shared/logs); clone it there to run these tests")


def _entry_id(entry: dict) -> str:
    return Path(entry["file"]).name[:48]


_RUNS: dict[str, tuple[int, object]] = {}


def run_doctor(entry: dict, capsys) -> tuple[int, object]:
    """(exit status, the JSON document printed) of ``dcal doctor FILE [--num-classes C] --json``, once per file."""
    if entry["file"] not in _RUNS:
        argv = [str(LOGS / entry["file"]), "--json"]
        if entry.get("num_classes"):
            argv += ["--num-classes", str(entry["num_classes"])]
        capsys.readouterr()
        code = doctor_main(argv)
        out = capsys.readouterr().out
        _RUNS[entry["file"]] = (code, json.loads(out))
    return _RUNS[entry["file"]]


_LOGS: dict[str, object] = {}


def reading(file: str, num_classes):
    if file not in _LOGS:
        _LOGS[file] = read_log(LOGS / file, num_classes=num_classes)
    return _LOGS[file]


def _values(log, name: str) -> np.ndarray:
    for df in (log.steps, log.evals):
        if name in df.columns:
            v = df[name].to_numpy(dtype=float)
            if np.isfinite(v).any():
                return v[np.isfinite(v)]
    return np.array([])


def test_the_corpus_covers_every_log():
    listed = {e["file"] for e in CORPUS}
    present = {f"{d.name}/{p.name}" for d in LOGS.iterdir() if d.is_dir() for p in d.iterdir()
               if p.is_file() and p.suffix.lower() != ".md"}
    assert present - listed == set(), "logs with no expectation in tests/data/doctor_corpus.yaml"
    assert listed - present == set(), "expectations for logs that are not there"


@pytest.mark.parametrize("entry", CORPUS, ids=_entry_id)
def test_exit_status_and_findings(entry, capsys):
    code, doc = run_doctor(entry, capsys)
    allowed = entry["exit"] if isinstance(entry["exit"], list) else [entry["exit"]]
    assert code in allowed, f"exit {code}, expected {allowed}: {doc}"
    if code in (2, 3):
        assert isinstance(doc, dict) and doc["exit"] == code and doc["reason"]
        return
    codes = {f["code"] for f in doc}
    assert set(entry.get("must", [])) <= codes, f"missing {set(entry.get('must', [])) - codes}; got {sorted(codes)}"
    assert not set(entry.get("must_not", [])) & codes, f"must not say {set(entry['must_not']) & codes}"
    if entry.get("no_error"):
        assert not [f for f in doc if f["severity"] == "error"], [f["message"] for f in doc if f["severity"] == "error"]
    if entry.get("not_healthy"):
        assert [f for f in doc if f["severity"] in ("error", "warning") and f["code"] not in NOT_A_DIAGNOSIS]
    if entry.get("crash_message"):
        crash = [f for f in doc if f["code"] == "crash"]
        assert not crash or entry["crash_message"] in crash[0]["message"]


@pytest.mark.parametrize("entry", [e for e in CORPUS if e["exit"] != 2], ids=_entry_id)
def test_what_is_read(entry):
    log = reading(entry["file"], entry.get("num_classes"))
    assert (log.source.format if log.source else "run") == entry["format"]
    for name in entry.get("reads", []):
        assert len(_values(log, name)), f"{name} not read; recognised: {log.source.recognised}"
    for name in entry.get("not_read", []):
        assert not len(_values(log, name)), f"{name} read, but the log does not hold it"
    facts = entry.get("facts", {})
    if "steps" in facts:
        assert len(log.steps) == facts["steps"]
    if "evals" in facts:
        assert len(log.evals) == facts["evals"]
    if "steps_with_loss" in facts:
        assert int(log.steps["loss"].notna().sum()) == facts["steps_with_loss"]
    if "max_val_acc" in facts:
        assert _values(log, "val_acc").max() <= facts["max_val_acc"]
    if "final_val_acc" in facts:
        assert math.isclose(log.evals["val_acc"].dropna().iloc[-1], facts["final_val_acc"], abs_tol=1e-3)
    if "eval_steps" in facts:
        assert log.evals["step"].tolist() == facts["eval_steps"]
    if "eval_steps_not" in facts:
        assert not set(log.evals["step"].tolist()) & set(facts["eval_steps_not"])
    if "same_evals_as" in facts:
        other = reading(facts["same_evals_as"], entry.get("num_classes"))
        np.testing.assert_allclose(log.evals["val_acc"].to_numpy(), other.evals["val_acc"].to_numpy(), atol=1e-4)
        assert log.evals["step"].tolist() == other.evals["step"].tolist()


IDEALLY = [(e, i) for e in CORPUS for i in e.get("ideally", [])]


@pytest.mark.parametrize("entry,ideal", IDEALLY, ids=[f"{_entry_id(e)}:{i['code']}" for e, i in IDEALLY])
def test_ideally(entry, ideal, capsys):
    code, doc = run_doctor(entry, capsys)
    found = [f for f in doc if f["code"] == ideal["code"]] if isinstance(doc, list) else []
    if ideal.get("evidence"):
        found = [f for f in found if ideal["evidence"] in json.dumps(f["evidence"])]
    if ideal.get("hard"):
        assert found, f"{ideal['code']} missing: {ideal['reason']}"
    elif not found:
        pytest.xfail(f"not yet: {ideal['code']} ({ideal['reason']})")
