"""`gate.shift_report` on synthetic runs: it measures the bundle's own novelty statistics and sees a strong shift."""

from __future__ import annotations

import json

import pytest

from gate_helpers import late_bundle, late_run, write_synthetic_run  # noqa: F401 (fixtures)
from vlmrel_core.gate.shift_report import NOVELTY_CANDIDATES, shift_report


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_loaded):
    root = tmp_path_factory.mktemp("shift_runs")
    fingerprint = tiny_loaded["late_fusion"].fingerprint
    return (write_synthetic_run(root / "in_domain", fingerprint, n=300, seed=1),
            write_synthetic_run(root / "shifted", fingerprint, n=300, seed=2, shift=1.0))


def _report(late_bundle, late_run, runs, **kwargs):
    in_domain, shifted = runs
    return shift_report(late_bundle.out_dir / "gate.yaml", late_run, [in_domain], {"strong": shifted},
                        window_sizes=(50,), n_windows=10, n_shift_windows=5, **kwargs)


def test_the_report_measures_the_shipped_novelty_and_alarms_on_a_strong_shift(late_bundle, late_run, runs):
    report = _report(late_bundle, late_run, runs)
    assert report["novelty_method"] == f"bundle:{late_bundle.novelty.method}"
    assert report["novelty_threshold"] == late_bundle.novelty.threshold
    assert report["novelty_best_on_shifts"] in NOVELTY_CANDIDATES
    strong = report["shifts"]["strong"]
    assert strong["windows"]["50"]["alarm_rate"] == 1.0 and strong["novelty_share"] > 0.5
    assert report["shifts"]["in_domain"]["novelty_share"] < 0.1


def test_best_on_shifts_refits_the_best_candidate(late_bundle, late_run, runs):
    report = _report(late_bundle, late_run, runs, novelty_source="best_on_shifts")
    assert report["novelty_method"] == report["novelty_best_on_shifts"]
    with pytest.raises(ValueError, match="novelty_source"):
        _report(late_bundle, late_run, runs, novelty_source="nearest")


def test_cli_shift_report_writes_both_files(tmp_path, late_bundle, late_run, runs, capsys):
    from vlmrel_core.cli.main import main

    in_domain, shifted = runs
    assert main(["shift-report", "--config", str(late_bundle.out_dir / "gate.yaml"), "--training-run", str(late_run),
                 "--in-domain", str(in_domain), "--shift", f"strong={shifted}", "--out", str(tmp_path / "out"),
                 "--windows", "5", "--shift-windows", "3", "--novelty-source", "best_on_shifts"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["goals"]["shifts"]["strong"]["alarm_rate"] == 1.0
    report = json.loads((tmp_path / "out" / "shift_report.json").read_text())["model"]
    assert report["novelty_method"] == report["novelty_best_on_shifts"]
    assert "| strong |" in (tmp_path / "out" / "shift_report.md").read_text()
